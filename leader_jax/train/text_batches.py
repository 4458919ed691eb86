"""Prompt tokenisation and deterministic, per-process batches for the teacher (and stage-1 text).

Encoding: `BOS + prompt + EOS`, explicit lengths, right padding to the encoding's width (the teacher pools
the EOS state at index `length - 1`); a batch may be cut down to its length bucket (`length_buckets`). A
prompt that does not fit loses its *oldest shown* history visits first, never the current visit;
truncations are counted. A prompt whose current visit alone does not fit is dropped and listed (training
split) or an error naming the sample (evaluation splits, features).

Batches: the sample order is an endless concatenation of per-epoch permutations seeded by (seed, epoch),
and step `s` takes stream positions `[s*G, (s+1)*G)`, G = accumulation x micro-batch. The data position is
therefore a pure function of the step (exact resume); with length buckets, `length_buckets.BucketedStream`
groups the same per-epoch permutations by bucket, again as a pure function of the step. Each process
gathers only the rows that live on its own devices and assembles the global array with
`make_array_from_process_local_data`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from leader_jax.train import distributed

if TYPE_CHECKING:
    from leader_jax.train.length_buckets import BucketedStream, PadStats


def encode_span(tokenizer: Any, text: str, span: tuple[int, int] | None) -> tuple[list[int], tuple[int, int]]:
    """(token ids as `encode_text`, token span [start, end) of the characters `span` = [a, b)): the tokens
    whose first non-space character lies inside [a, b) (a byte-level BPE token carries the space before a
    word), from the fast tokenizer's offsets; without offsets, from the token counts of the text before a
    and before b. (0, 0) when `span` is None or empty."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if span is None or span[0] >= span[1]:
        return encode_text(tokenizer, text), (0, 0)
    a, b = span
    if hasattr(backend, "encode") and hasattr(backend, "token_to_id"):        # a `tokenizers.Tokenizer`
        out = backend.encode(text, add_special_tokens=False)
        ids = list(out.ids)
        starts = [s + len(text[s:e]) - len(text[s:e].lstrip()) if text[s:e].strip() else s
                  for s, e in out.offsets]                  # first non-space character of each token
        start = next((i for i, c in enumerate(starts) if c >= a), len(ids))
        end = next((i for i, c in enumerate(starts) if c >= b), len(ids))
        return ids, (start, end)
    ids = encode_text(tokenizer, text)
    return ids, (len(encode_text(tokenizer, text[:a])), len(encode_text(tokenizer, text[:b])))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens, for a `tokenizers.Tokenizer` or a transformers tokenizer."""
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    return list(out.ids) if hasattr(out, "ids") else list(out)


@dataclasses.dataclass
class SpecialIds:
    bos: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, bos: int | None = None, eos: int | None = None,
                       pad: int | None = None) -> "SpecialIds":
        def tok_id(*names):
            for n in names:
                if hasattr(tokenizer, "token_to_id"):
                    i = tokenizer.token_to_id(n)
                else:
                    i = tokenizer.convert_tokens_to_ids(n)
                    i = None if i == getattr(tokenizer, "unk_token_id", -1) and n != getattr(
                        tokenizer, "unk_token", None) else i
                if i is not None:
                    return int(i)
            return None

        def first(*candidates):             # id 0 is a valid token id: only None means "missing"
            return next((c for c in candidates if c is not None), None)

        bos = first(bos, getattr(tokenizer, "bos_token_id", None), tok_id("<s>", "<bos>"))
        eos = first(eos, getattr(tokenizer, "eos_token_id", None), tok_id("</s>", "<eos>"))
        pad = first(pad, getattr(tokenizer, "pad_token_id", None), tok_id("<pad>", "<unk>"), 0)
        if bos is None or eos is None:
            raise ValueError("the tokenizer has no BOS/EOS token (bos_token_id/eos_token_id, or a <s>/</s> "
                             "or <bos>/<eos> token)")
        return cls(int(bos), int(eos), int(pad))


@dataclasses.dataclass
class Encoded:
    """Right-padded token ids of one split, with the bookkeeping the teacher and the store need."""
    ids: np.ndarray            # int32 [N, T]
    lengths: np.ndarray        # int32 [N]
    sample_ids: list[str]
    labels: np.ndarray | None  # uint8 [N, n_med]
    single_visit: np.ndarray   # bool [N]
    n_truncated: int = 0       # prompts that lost history visits to fit
    n_history_dropped: int = 0  # history visits removed in total
    dropped_ids: list[str] = dataclasses.field(default_factory=list)  # samples whose current visit is too long
    skip: np.ndarray | None = None  # int32 [N, 2]: token span [start, end) the query pooling leaves out
                                    # (retrieval prompts: the neighbour block; [0, 0] = none)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, rows) -> "Encoded":
        rows = np.asarray(rows, dtype=np.int64)
        return Encoded(ids=self.ids[rows], lengths=self.lengths[rows],
                       sample_ids=[self.sample_ids[i] for i in rows],
                       labels=None if self.labels is None else self.labels[rows],
                       single_visit=self.single_visit[rows], skip=None if self.skip is None else self.skip[rows])

    def mask(self, rows=None) -> np.ndarray:
        lengths = self.lengths if rows is None else self.lengths[rows]
        return (np.arange(self.ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)


def encode_samples(samples: Sequence[Any], vocab: Any, tokenizer: Any, special: SpecialIds, max_len: int, *,
                   max_history: int = 3, profile: bool = False, labels: np.ndarray | None = None,
                   build_prompt: Callable | None = None, split: str = "", overlong: str = "error",
                   skip_span: Callable[[str], tuple[int, int] | None] | None = None) -> Encoded:
    """Tokenise teacher prompts; drop the oldest shown history visits until `BOS+prompt+EOS <= max_len`.

    `skip_span(prompt)` (retrieval prompts): the character span of the part the query pooling leaves out
    (the neighbour block), recorded as token spans in `Encoded.skip`.
    A sample whose current visit alone is longer than `max_len` raises (overlong="error", evaluation
    splits) or is left out and listed in `dropped_ids` (overlong="drop", training split)."""
    if build_prompt is None:
        from leader_jax.data.prompts import build_prompt
    if overlong not in ("error", "drop"):
        raise ValueError(f"overlong={overlong!r}; expected error | drop")
    n = len(samples)
    ids = np.full((n, max_len), special.pad, dtype=np.int32)
    lengths = np.zeros((n,), np.int32)
    n_trunc = n_dropped = 0
    keep = np.ones((n,), bool)
    skip = np.zeros((n, 2), np.int32)
    for i, s in enumerate(samples):
        shown = min(max_history, len(s.history))
        for h in range(shown, -1, -1):
            text = build_prompt(s, vocab, max_history=h, profile=profile)
            body, span = encode_span(tokenizer, text, None if skip_span is None else skip_span(text))
            toks = [special.bos] + body + [special.eos]
            if len(toks) <= max_len:
                break
        else:
            if overlong == "drop":
                keep[i] = False
                continue
            raise ValueError(f"{split or 'data'} sample {s.id!r}: the current visit alone needs {len(toks)} "
                             f"tokens > max_len={max_len}; raise data.eval_max_len / data.max_len "
                             f"(the current visit is never cut)")
        if h < shown:
            n_trunc += 1
            n_dropped += shown - h
        ids[i, :len(toks)] = toks
        lengths[i] = len(toks)
        skip[i] = (span[0] + 1, span[1] + 1) if span[1] > span[0] else (0, 0)      # + 1: the BOS
    return Encoded(ids=ids[keep], lengths=lengths[keep], sample_ids=[s.id for s, k in zip(samples, keep) if k],
                   labels=None if labels is None else labels[keep],
                   single_visit=np.array([s.single_visit for s, k in zip(samples, keep) if k], dtype=bool),
                   n_truncated=n_trunc, n_history_dropped=n_dropped,
                   dropped_ids=[s.id for s, k in zip(samples, keep) if not k],
                   skip=skip[keep] if skip_span is not None else None)


SEGMENT_SEP = "\x1e"   # in a stage-1 document: replaced by an EOS token ("BOS prompt EOS drugs EOS")


def encode_texts(texts: Sequence[str], tokenizer: Any, special: SpecialIds, max_len: int) -> Encoded:
    """Stage-1 corpus: `BOS + text + EOS` (each SEGMENT_SEP becomes an EOS), cut to max_len."""
    n = len(texts)
    ids = np.full((n, max_len), special.pad, dtype=np.int32)
    lengths = np.zeros((n,), np.int32)
    n_trunc = 0
    for i, t in enumerate(texts):
        toks = [special.bos]
        for j, seg in enumerate(t.split(SEGMENT_SEP)):
            toks += ([special.eos] if j else []) + encode_text(tokenizer, seg)
        toks.append(special.eos)
        if len(toks) > max_len:
            toks, n_trunc = toks[:max_len], n_trunc + 1
        ids[i, :len(toks)] = toks
        lengths[i] = len(toks)
    return Encoded(ids=ids, lengths=lengths, sample_ids=[str(i) for i in range(n)], labels=None,
                   single_visit=np.zeros((n,), bool), n_truncated=n_trunc)


def stream_indices(n: int, start: int, count: int, seed: int) -> np.ndarray:
    """Positions [start, start+count) of the endless stream of per-epoch permutations of range(n)."""
    out = np.empty((count,), np.int64)
    pos, k = start, 0
    while k < count:
        epoch, off = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(n - off, count - k)
        out[k:k + take] = perm[off:off + take]
        k, pos = k + take, pos + take
    return out


def _mask(lengths: np.ndarray, t: int) -> np.ndarray:
    return (np.arange(t)[None, :] < np.asarray(lengths)[..., None]).astype(np.int32)


def train_batch(enc: Encoded, step: int, accum: int, micro: int, seed: int, mesh, *,
                stream: "BucketedStream | None" = None, stats: "PadStats | None" = None,
                prefix: Any = None) -> tuple[dict, int]:
    """Global batch of `step` as sharded arrays [accum, micro, ...]; returns (batch, real tokens).

    Without `stream` the rows are stream positions [step*G, (step+1)*G) padded to the encoding's width;
    with a `length_buckets.BucketedStream` they are its group of `step`, padded to that group's bucket.
    With `prefix` (a `frozen_prefix.PrefixCache`) the batch also holds the cached lower-layer activations
    (`hidden` [accum, micro, T, D])."""
    from leader_jax.train.engine import stacked_batch_sharding

    g = accum * micro
    if stream is None:
        idx, t = stream_indices(len(enc), step * g, g, seed), enc.ids.shape[1]
    else:
        idx, t = stream.step_rows(step)
    idx = idx.reshape(accum, micro)
    sh = stacked_batch_sharding(mesh, 3)
    local = distributed.local_rows(sh, (accum, micro, t), axis=1)
    rows = idx[:, local]                                  # only this process's share
    batch = {"attention_mask": distributed.global_array(_mask(enc.lengths[rows], t), sh, (accum, micro, t)),
             "input_ids": distributed.global_array(enc.ids[rows][..., :t], sh, (accum, micro, t))}
    if prefix is not None:
        prefix.ensure(idx)                                # every process: the same global rows
        d = prefix.dim
        batch["hidden"] = distributed.global_array(prefix.rows(rows.ravel(), t).reshape(rows.shape + (t, d)),
                                                   stacked_batch_sharding(mesh, 4), (accum, micro, t, d))
    if enc.skip is not None:
        batch["pool_skip"] = distributed.global_array(enc.skip[rows], sh, (accum, micro, 2))
    if enc.labels is not None:
        m = enc.labels.shape[1]
        batch["labels"] = distributed.global_array(enc.labels[rows], stacked_batch_sharding(mesh, 3),
                                                   (accum, micro, m))
    n_tok = int(enc.lengths[idx].sum())
    if stats is not None:
        stats.add(n_tok, g, t, (accum, micro, t))
    return batch, n_tok


def eval_batches(enc: Encoded, batch_size: int, mesh, *, buckets: Sequence[int] | None = None,
                 stats: "PadStats | None" = None, prefix: Any = None):
    """Yield (row indices, sharded {input_ids, attention_mask} [B, T]) covering the split once; a short
    last batch is filled by repeating its last row. Without `buckets` the rows go in order, padded to the
    encoding's width; with `buckets` they go sorted by length, each batch padded to its bucket
    (`length_buckets.eval_plan`). With `prefix`, the batch also holds `hidden` [B, T, D]."""
    from leader_jax.sharding import batch_sharding
    from leader_jax.train.length_buckets import bucket_set, eval_plan

    n, width = len(enc), enc.ids.shape[1]
    if buckets:
        plan = eval_plan(enc.lengths, batch_size, bucket_set(buckets, width))
    else:
        plan = [(np.arange(s, min(s + batch_size, n)), width) for s in range(0, n, batch_size)]
    sh = batch_sharding(mesh, 2)
    for rows, t in plan:
        full = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])]) if len(rows) < batch_size \
            else rows
        local = distributed.local_rows(sh, (batch_size, t), axis=0)
        sel = full[local]
        batch = {"attention_mask": distributed.global_array(_mask(enc.lengths[sel], t), sh, (batch_size, t)),
                 "input_ids": distributed.global_array(enc.ids[sel][:, :t], sh, (batch_size, t))}
        if enc.skip is not None:
            batch["pool_skip"] = distributed.global_array(enc.skip[sel], sh, (batch_size, 2))
        if prefix is not None:
            prefix.ensure(full)                           # every process: the same global rows
            batch["hidden"] = distributed.global_array(prefix.rows(sel, t), batch_sharding(mesh, 3),
                                                       (batch_size, t, prefix.dim))
        if stats is not None:
            stats.add(int(enc.lengths[rows].sum()), batch_size, t)
        yield rows, batch
