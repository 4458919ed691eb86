"""The retrieval prompts of one teacher run: memory + candidate pools + rendering.

Training, feature extraction and prediction each build a `RunRetrieval`, so the same patient gets the same
prompt in all three. A run keeps its retrieval files in `RUN/retrieval/`:
- `memory.npz`: the training-split memory (`Memory.save`), written when the teacher starts;
- `<split>.npz`: the candidate pools of a prepared split (`candidates.save_pools`), checked against the
  prepared-data fingerprint and the pool settings when read and rebuilt when missing or stale.
New patients (prediction) get pools computed on the fly from the saved memory; they are queries whose
visit time is "" (later than every memory visit). `similarity=oracle` ranks by the query's true drugs,
so it is refused wherever those are unknown (new patients).
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from leader_jax.cli import UserError
from leader_jax.retrieval import render
from leader_jax.retrieval.candidates import PoolSettings, Pools, build_pools, split_pools
from leader_jax.retrieval.memory import Memory, Queries

MEMORY_FILE = "memory.npz"
WIRED_MODES = ("none", "fixed")


def retrieval_dir(run: str | Path) -> Path:
    return Path(run) / "retrieval"


def check_wired(rcfg, prefix: str = "retrieval.") -> None:
    """UserError for a retrieval mode the teacher does not run yet (joint)."""
    if rcfg.mode not in WIRED_MODES:
        raise UserError(f"{prefix}mode={rcfg.mode!r} is not wired into the teacher yet (the re-ranker's "
                        f"training step is still to come); use {' | '.join(WIRED_MODES)}")


@dataclasses.dataclass
class RunRetrieval:
    """What a teacher run needs to render retrieval prompts (mode fixed)."""
    memory: Memory
    settings: PoolSettings
    k: int
    budget: int
    vocab: Any                     # the prepared data's Vocab
    cache_dir: Path | None         # RUN/retrieval where pools are read and written; None = compute only

    @classmethod
    def for_training(cls, rcfg, prepared, run: str | Path, *, write: bool) -> "RunRetrieval | None":
        """The retrieval of a starting teacher run (None for mode none): the memory of the prepared
        training split, saved as RUN/retrieval/memory.npz when `write` (the main process)."""
        check_wired(rcfg)
        if rcfg.mode == "none":
            return None
        memory = Memory.from_prepared(prepared)
        if write:
            memory.save(retrieval_dir(run) / MEMORY_FILE)
        return cls(memory, PoolSettings.from_config(rcfg), int(rcfg.k), int(rcfg.budget), prepared.vocab,
                   retrieval_dir(run) if write else None)

    @classmethod
    def for_run(cls, rcfg, run: str | Path, vocab, *, fingerprint: str | None = None,
                write: bool = False) -> "RunRetrieval | None":
        """The retrieval of a trained run (None for mode none), from its saved RUN/retrieval/memory.npz.
        `fingerprint`: the prepared data the caller encodes; a memory built from other data is refused."""
        check_wired(rcfg)
        if rcfg.mode == "none":
            return None
        path = retrieval_dir(run) / MEMORY_FILE
        if not path.is_file():
            raise UserError(f"{path} not found: the teacher run was trained with retrieval.mode={rcfg.mode} "
                            f"and needs its retrieval memory (train the teacher again to rewrite it)")
        try:
            memory = Memory.load(path)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: cannot read the retrieval memory ({e})") from None
        if fingerprint is not None and memory.fingerprint != fingerprint:
            raise UserError(f"{path}: built from prepared data {memory.fingerprint[:12]}…, but the run's data "
                            f"is {fingerprint[:12]}…; train the teacher again on this data")
        return cls(memory, PoolSettings.from_config(rcfg), int(rcfg.k), int(rcfg.budget), vocab,
                   retrieval_dir(run) if write else None)

    # ------------------------------------------------------------------------------------------ pools
    def split_pools(self, samples: Sequence, split: str) -> Pools:
        """Pools of a prepared split: RUN/retrieval/<split>.npz when it matches, else built (and saved)."""
        return split_pools(self.memory, samples, self.settings, split, self.cache_dir)

    def input_pools(self, samples: Sequence) -> Pools:
        """Pools of new patients (no labels, no comparable time): queries with time "" (later than every
        memory visit); their own patient id still excludes that patient's memory visits."""
        if self.settings.similarity == "oracle":
            raise UserError(oracle_refusal())
        q = Queries.from_samples(samples)
        q = dataclasses.replace(q, times=np.full(len(q), "", dtype=str))
        return build_pools(self.memory, q, self.settings, split="input")

    # ------------------------------------------------------------------------------------------ prompts
    def neighbours(self, pools: Pools) -> dict[str, list[str]]:
        """query id -> the rendered sentences of its top-k neighbours, best first."""
        return {q: render.neighbour_texts(self.memory, row, self.vocab)
                for q, row in zip(pools.query_ids, pools.top(self.k))}

    def builder(self, pools: Pools, tokenizer, max_len: int) -> Callable:
        """A `build_prompt` for `text_batches.encode_samples`: the LEADER prompt with the neighbours of
        `pools` inside the budget (`retrieval.budget` tokens; BOS + prompt + EOS <= max_len)."""
        from leader_jax.data.prompts import build_prompt
        from leader_jax.train.text_batches import encode_text

        return render.prompt_builder(build_prompt, self.neighbours(pools), max_len=int(max_len),
                                     measure=lambda text: len(encode_text(tokenizer, text)), budget=self.budget)

    def info(self) -> dict:
        """summary.json / feature-store record of the retrieval settings."""
        return {"mode": "fixed", "k": self.k, "budget": self.budget, "memory_visits": len(self.memory),
                **self.settings.to_json()}


def oracle_refusal() -> str:
    return ("retrieval.similarity=oracle ranks neighbours by the query's true drugs (an upper bound for "
            "evaluation on prepared splits); new patients have no known drugs, so this run cannot predict")


def unique_ids(samples: Sequence) -> list:
    """The samples with positional ids (`q0`, `q1`, ...): input ids may repeat, and the neighbours are
    looked up by id. Ids do not enter the prompt; the patient id (leakage rule) is kept."""
    return [dataclasses.replace(s, id=f"q{i}") for i, s in enumerate(samples)]
