"""Retrieved neighbours as prompt sentences, inserted into the teacher's prompt inside a length budget.

One sentence per neighbour, best first, each ending like the prompt's history lines:
    A similar past patient had diagnosis: <DX>; procedures: <PX>; and was prescribed: <MED>. \\n
The block goes right before the query's current visit ("In this visit, he has diagnosis: ..."), so the
prompt still ends with the current visit and the question. Budget rule: neighbours are dropped whole,
lowest-ranked first, until the block fits `budget` (if > 0) and the whole prompt passes `fits`; the base
prompt (profile, history, current visit) is never changed here, so the current visit is never cut. Used
inside `text_batches.encode_samples` (through `prompt_builder`), whose own loop drops the oldest shown
history visits only when the base prompt alone does not fit: history keeps priority over neighbours.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from leader_jax.data.dataset import Vocab
from leader_jax.data.prompts import display
from leader_jax.retrieval.memory import Memory

CURRENT_VISIT = "In this visit, he has diagnosis: "   # where the current visit starts in prompts.build_prompt
NEIGHBOUR = "A similar past patient had diagnosis: "   # how every neighbour sentence starts


def neighbour_sentence(memory: Memory, j: int, vocab: Vocab) -> str:
    return (f"{NEIGHBOUR}{display(memory.diagnoses[j], vocab)}; "
            f"procedures: {display(memory.procedures[j], vocab)}; "
            f"and was prescribed: {display(memory.medications[j], vocab)}. \n ")


def neighbour_texts(memory: Memory, rows: np.ndarray, vocab: Vocab) -> list[str]:
    """Sentences of one query's neighbours (`rows`: memory indices best first, -1 = none)."""
    return [neighbour_sentence(memory, int(j), vocab) for j in rows if j >= 0]


@dataclasses.dataclass(frozen=True)
class Augmented:
    text: str
    shown: int          # neighbours kept
    dropped: int        # neighbours left out by the budget


def insert_block(base_prompt: str, block: str) -> str:
    """`block` placed right before the current visit of `base_prompt` (ValueError if there is none)."""
    at = base_prompt.rfind(CURRENT_VISIT)
    if at < 0:
        raise ValueError(f"the prompt has no current-visit sentence ({CURRENT_VISIT!r}): cannot place "
                         f"the neighbours")
    return base_prompt[:at] + block + base_prompt[at:]


def block_span(prompt: str) -> tuple[int, int] | None:
    """Character span [a, b) of the neighbour block of a rendered prompt (from its first neighbour
    sentence to the current visit), None when it shows no neighbour. The query pooling leaves it out."""
    b = prompt.rfind(CURRENT_VISIT)
    a = prompt.find(NEIGHBOUR, 0, max(b, 0))
    return None if a < 0 or b < 0 else (a, b)


def split_at_current_visit(base_prompt: str) -> tuple[str, str]:
    """(head, tail) of a base prompt around the neighbour block's place: head + block + tail."""
    at = insert_block(base_prompt, "\0").index("\0")
    return base_prompt[:at], base_prompt[at:]


def compose_ids(head: Sequence[int], neighbours: Sequence[Sequence[int]], tail: Sequence[int], *,
                max_len: int, budget: int = 0, bos: int | None = None, eos: int | None = None) -> list[int]:
    """Token-level `augment` for prompts assembled per step (the joint mode picks neighbours with the
    current re-ranker): [bos] + head + best neighbours + tail + [eos], neighbours dropped whole from the
    lowest rank until the block fits `budget` (> 0) and the whole fits `max_len`. Each part is tokenised
    on its own, so use the same composition at training and inference. ValueError when head + tail alone
    do not fit (the current visit is never cut; shorten the history first)."""
    pre, post = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    fixed = len(pre) + len(head) + len(tail) + len(post)
    if fixed > max_len:
        raise ValueError(f"the prompt without neighbours needs {fixed} tokens > max_len={max_len}")
    n = len(neighbours)
    while n > 0:
        block = sum(len(x) for x in neighbours[:n])
        if (budget <= 0 or block <= budget) and fixed + block <= max_len:
            break
        n -= 1
    return pre + list(head) + [t for x in neighbours[:n] for t in x] + list(tail) + post


def augment(base_prompt: str, neighbours: Sequence[str], *, budget: int = 0,
            measure: Callable[[str], int] = len, fits: Callable[[str], bool] | None = None) -> Augmented:
    """The base prompt with as many of the best `neighbours` as the budget allows.

    `measure(text)` is the length unit of `budget` (characters by default; tokens with a tokenizer);
    `budget` <= 0 means no cap of its own. `fits(prompt)` is the caller's whole-prompt limit (e.g.
    BOS + prompt + EOS <= max_len). With no neighbour kept the base prompt is returned unchanged."""
    for n in range(len(neighbours), 0, -1):
        block = "".join(neighbours[:n])
        if budget > 0 and measure(block) > budget:
            continue
        text = insert_block(base_prompt, block)
        if fits is None or fits(text):
            return Augmented(text, n, len(neighbours) - n)
    return Augmented(base_prompt, 0, len(neighbours))


def prompt_builder(base_builder: Callable, neighbours_by_id: Mapping[str, Sequence[str]], *, max_len: int,
                   measure: Callable[[str], int], budget: int = 0) -> Callable:
    """A `build_prompt(sample, vocab, max_history=, profile=)` for `text_batches.encode_samples`: the base
    prompt plus the sample's neighbours, kept only while `measure(prompt) + 2 <= max_len` (BOS and EOS).
    `measure` should count tokens (e.g. `lambda t: len(text_batches.encode_text(tokenizer, t))`)."""
    def build(sample, vocab, max_history: int = 3, profile: bool = False) -> str:
        base = base_builder(sample, vocab, max_history=max_history, profile=profile)
        if sample.id not in neighbours_by_id:
            raise ValueError(f"sample {sample.id!r} has no retrieved neighbours (candidate pools of another "
                             f"split or data?)")
        return augment(base, neighbours_by_id[sample.id], budget=budget, measure=measure,
                       fits=lambda text: measure(text) + 2 <= max_len).text

    return build
