"""The retrieval prompts of one teacher run: memory + candidate pools + rendering (+ the re-ranker).

Training, feature extraction and prediction each build a `RunRetrieval`, so the same patient gets the same
prompt in all three. A run keeps its retrieval files in `RUN/retrieval/`:
- `memory.npz`: the training-split memory (`Memory.save`), written when the teacher starts;
- `<split>.npz`: the candidate pools of a prepared split (`candidates.save_pools`), checked against the
  prepared-data fingerprint and the pool settings when read and rebuilt when missing or stale.
New patients (prediction) get pools computed on the fly from the saved memory; they are queries whose
visit time is "" (later than every memory visit). `similarity=oracle` ranks by the query's true drugs,
so it is refused wherever those are unknown (new patients).

Mode fixed renders each pool's B0 top-k as text (`builder`); mode joint ranks each pool with the run's
re-ranker (`follow(engine)`: the engine's current parameters) and composes token ids from separately
tokenised parts (`leader_jax.retrieval.joint`). `encode` is the one entry point for both.
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


RETRIEVAL_DIR = "retrieval"           # RUN/retrieval/ of a teacher or student run


def retrieval_dir(run: str | Path) -> Path:
    return Path(run) / RETRIEVAL_DIR


@dataclasses.dataclass
class RunRetrieval:
    """What a teacher run needs to render retrieval prompts (mode fixed or joint)."""
    memory: Memory
    settings: PoolSettings
    k: int
    budget: int
    vocab: Any                     # the prepared data's Vocab
    cache_dir: Path | None         # RUN/retrieval where pools are read and written; None = compute only
    mode: str = "fixed"
    joint: dict = dataclasses.field(default_factory=dict)   # joint settings (summary record)
    ranker: Any = None             # joint: a joint.Ranker on the current re-ranker (`follow`)
    _nb_ids: dict = dataclasses.field(default_factory=dict, repr=False)     # tokenizer id -> ids per memory row
    _parts: dict = dataclasses.field(default_factory=dict, repr=False)      # (split, max_len, ...) -> Parts

    @classmethod
    def for_training(cls, rcfg, prepared, run: str | Path, *, write: bool) -> "RunRetrieval | None":
        """The retrieval of a starting teacher run (None for mode none): the memory of the prepared
        training split, saved as RUN/retrieval/memory.npz when `write` (the main process)."""
        if rcfg.mode == "none":
            return None
        memory = Memory.from_prepared(prepared)
        if write:
            memory.save(retrieval_dir(run) / MEMORY_FILE)
        return cls(memory, PoolSettings.from_config(rcfg), int(rcfg.k), int(rcfg.budget), prepared.vocab,
                   retrieval_dir(run) if write else None, rcfg.mode, joint_info(rcfg))

    @classmethod
    def for_run(cls, rcfg, run: str | Path, vocab, *, fingerprint: str | None = None,
                write: bool = False) -> "RunRetrieval | None":
        """The retrieval of a trained run (None for mode none), from its saved RUN/retrieval/memory.npz.
        `fingerprint`: the prepared data the caller encodes; a memory built from other data is refused."""
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
                   retrieval_dir(run) if write else None, rcfg.mode, joint_info(rcfg))

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
        return {"mode": self.mode, "k": self.k, "budget": self.budget, "memory_visits": len(self.memory),
                **self.settings.to_json(), **({"joint": self.joint} if self.mode == "joint" else {})}

    # ------------------------------------------------------------------------------------------ joint
    def follow(self, engine) -> None:
        """Mode joint: rank pools with the re-ranker in `engine`'s trainable state (read at each call, so
        training, validation and the final predictions use the parameters of that moment)."""
        from leader_jax.retrieval.joint import Ranker

        if self.mode == "joint":
            self.ranker = Ranker.of_engine(engine)

    def neighbour_ids(self, tokenizer) -> list[list[int]]:
        """Token ids of every memory visit's neighbour sentence (tokenised once per tokenizer)."""
        from leader_jax.train.text_batches import encode_text

        key = id(tokenizer)
        if key not in self._nb_ids:
            self._nb_ids[key] = [encode_text(tokenizer, render.neighbour_sentence(self.memory, j, self.vocab))
                                 for j in range(len(self.memory))]
        return self._nb_ids[key]

    def composer(self, tokenizer, special):
        from leader_jax.retrieval.joint import Composer

        return Composer(self.neighbour_ids(tokenizer), special, self.budget)

    def parts(self, samples: Sequence, split: str, tokenizer, special, max_len: int, *, pools: Pools | None = None,
              **kw):
        """Mode joint: the split's prompt parts and re-ranker inputs (`joint.build_parts`), cached per
        (split, max_len, settings) for prepared splits; `pools` given (new patients): never cached."""
        from leader_jax.retrieval.joint import parts_for

        if pools is not None:
            return parts_for(self, samples, pools, tokenizer, special, max_len, split=split, **kw)
        key = (split, int(max_len), id(tokenizer), tuple(sorted((k, str(v)) for k, v in kw.items()
                                                                 if k != "labels")))
        if key not in self._parts:
            self._parts[key] = parts_for(self, samples, self.split_pools(samples, split), tokenizer, special,
                                         max_len, split=split, **kw)
        return self._parts[key]

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, samples: Sequence, split: str, tokenizer, special, max_len: int, *, max_history: int,
               profile: bool, labels, overlong: str, pools: Pools | None = None):
        """`text_batches.Encoded` of `samples` with their neighbours: the pools of the prepared split
        `split` (or the given `pools`, for new patients); mode fixed renders the pools' top-k as text, mode
        joint composes the re-ranker's top-k from token parts. ValueError on a prompt that cannot fit."""
        from leader_jax.train import text_batches as tdata

        if self.mode == "joint":
            if self.ranker is None:
                raise ValueError("RunRetrieval.encode (mode joint): call follow(engine) first")
            parts = self.parts(samples, split, tokenizer, special, max_len, pools=pools, max_history=max_history,
                               profile=profile, labels=labels, overlong=overlong)
            pos, ok = self.ranker.top_k(parts.inputs, self.k)
            return self.composer(tokenizer, special).encode(parts, pos, ok, max_len)
        pools = self.split_pools(samples, split) if pools is None else pools
        return tdata.encode_samples(samples, self.vocab, tokenizer, special, max_len, max_history=max_history,
                                    profile=profile, labels=labels, split=split, overlong=overlong,
                                    build_prompt=self.builder(pools, tokenizer, max_len),
                                    skip_span=render.block_span)


def joint_info(rcfg) -> dict:
    """The joint block as recorded in summaries (empty unless mode joint)."""
    return rcfg.joint.to_dict() if rcfg.mode == "joint" else {}


def oracle_refusal() -> str:
    return ("retrieval.similarity=oracle ranks neighbours by the query's true drugs (an upper bound for "
            "evaluation on prepared splits); new patients have no known drugs, so this run cannot predict")


def unique_ids(samples: Sequence) -> list:
    """The samples with positional ids (`q0`, `q1`, ...): input ids may repeat, and the neighbours are
    looked up by id. Ids do not enter the prompt; the patient id (leakage rule) is kept."""
    return [dataclasses.replace(s, id=f"q{i}") for i, s in enumerate(samples)]
