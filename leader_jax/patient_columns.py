"""Columnar, vectorised reading of patient JSONL chunks for `python -m leader_jax.predict`.

A chunk of lines is parsed at once by pyarrow's JSON reader against the input schema (`leader_jax.
patient_input`), every code of the chunk is mapped to a vocabulary id with one hash lookup per field,
and the student's index arrays (`EncodedSplit`) are built with numpy: no per-patient Python work on the
common path. It gives exactly what the per-line path (`patient_input.parse_lines` + the student's
`encode_samples`) gives, and it hands that path every line it is not sure about:

- a line the arrow reader refuses (not JSON, a field of the wrong type, an unknown field, a duplicate
  key, two objects on a line): the chunk is split in halves until the bad lines are isolated;
- a line containing `null` (arrow cannot tell a null from a missing field), a BOM, an empty or missing
  `visits` list, or several unknown profile values (their order is the JSON key order).

Codes not found as written go through `CodeResolver.resolve` one by one (dots, spaces, ambiguity,
the reason), so `unknown_codes` is the per-line path's, in the same order.
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Sequence

import numpy as np

from leader_jax.data.dataset import UNKNOWN
from leader_jax.patient_input import (
    FIELDS,
    VOCAB_OF,
    CodeResolver,
    ParsedLine,
    parse_lines,
)

OK, NO_PREDICTION, ERROR = 0, 1, 2
NO_KNOWN_CODE = "the current (last) visit has no diagnosis or procedure code in the run's vocabulary"
_STREAM = {"diagnoses": "diag", "procedures": "proc", "medications": "med"}
_MIN_SPLIT = 16            # a failing piece of at most this many lines goes line by line


@dataclasses.dataclass
class Records:
    """The records of one chunk, in input order (columnar): what the output renderer needs, and the
    model inputs of the records with a prediction (`kind == OK`, in the same order)."""

    line: np.ndarray            # int64 [n] input line numbers (-1: none, the Python API)
    kind: np.ndarray            # int8 [n]: OK | NO_PREDICTION | ERROR
    ids: list                   # patient id (str; "" for an error)
    text: list                  # ERROR: the message; NO_PREDICTION: the reason; OK: ""
    unknown: list               # JSON text of unknown_codes ("" for an error)
    dropped: list               # JSON text of dropped_visits ("" for an error)
    enc: Any = None             # student EncodedSplit of the OK records (fast path / merged)
    samples: list | None = None  # Samples of the OK records (per-line path), when enc is None

    def __len__(self) -> int:
        return len(self.kind)


def records_from_parsed(parsed: Sequence[ParsedLine], lines: bool = True) -> Records:
    """Records of per-line parse results (`ParsedLine`s, or `PatientInput`s with lines=False)."""
    n = len(parsed)
    line = np.full(n, -1, np.int64)
    kind = np.zeros(n, np.int8)
    ids, text, unknown, dropped, samples = [], [], [], [], []
    for i, item in enumerate(parsed):
        p = item.patient if lines else item
        if lines:
            line[i] = item.line
        if p is None:
            kind[i] = ERROR
            ids.append(""), text.append(item.error), unknown.append(""), dropped.append("")
            continue
        ids.append(p.id)
        unknown.append(json.dumps(p.unknown_codes, ensure_ascii=False) if p.unknown_codes else "[]")
        dropped.append(json.dumps(p.dropped_visits) if p.dropped_visits else "[]")
        if p.sample is None:
            kind[i] = NO_PREDICTION
            text.append(p.no_prediction)
        else:
            text.append("")
            samples.append(p.sample)
    return Records(line, kind, ids, text, unknown, dropped, samples=samples)


class ChunkParser:
    """JSONL lines → `Records` with the student's encoding (see the module docstring)."""

    def __init__(self, resolver: CodeResolver, max_visits: int):
        import pyarrow as pa

        self.resolver, self.vocab, self.max_visits = resolver, resolver.vocab, int(max_visits)
        vocab = self.vocab
        self.keys, self.key_ids = {}, {}
        for f in FIELDS:                      # every spelling found as is → token id + 1
            index = vocab.index(VOCAB_OF[f])
            table = resolver.table[f]
            self.keys[f] = pa.array(list(table), pa.string())
            self.key_ids[f] = np.fromiter((index[t] + 1 for t in table.values()), np.int64, len(table))
        self.n_tok = {f: len(getattr(vocab, VOCAB_OF[f])) + 1 for f in FIELDS}
        self.fields = tuple(vocab.profile)
        self.prof_values = {k: pa.array(list(vocab.profile[k]), pa.string()) for k in self.fields}
        self.prof_unknown = {k: vocab.profile_index(k, UNKNOWN) for k in self.fields}
        codes = pa.list_(pa.string())
        visit = pa.struct([(f, codes) for f in FIELDS] + [("id", pa.string()), ("time", pa.string())])
        profile = pa.struct([(k, pa.string()) for k in self.fields])
        self.schema = pa.schema([("id", pa.string()), ("profile", profile), ("visits", pa.list_(visit))])

    # ------------------------------------------------------------------------------------ parsing
    def parse(self, lines: Sequence[str], first_line: int = 1) -> Records:
        """Records of the non-blank `lines` (numbered from `first_line`), in order."""
        fast, slow = [], []
        for i, s in enumerate(lines):
            if not s.strip():
                continue
            (slow if "null" in s or s[0] == "\ufeff" else fast).append(i)
        tables, refused = self._read(lines, fast)
        slow += refused
        parts = []
        if tables:
            import pyarrow as pa
            rows = np.asarray([i for _, idx in tables for i in idx], np.int64)
            rec, back = self._columns(pa.concat_tables([t for t, _ in tables]).combine_chunks(), rows + first_line)
            parts.append(rec)
            slow += rows[back].tolist()
        if slow:
            parsed = [p for i in sorted(slow) for p in parse_lines([lines[i]], self.resolver, first_line=first_line + i)]
            slow_rec = records_from_parsed(parsed)
            slow_rec.enc = self._encode_samples(slow_rec.samples)
            parts.append(slow_rec)
        return merge(parts)

    def _read(self, lines, idx: list[int]):
        """Arrow tables of the lines `idx` (pieces in order) and the lines arrow refused."""
        import pyarrow as pa
        import pyarrow.json as pj

        if not idx:
            return [], []
        text = "".join(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in idx).encode("utf-8")
        try:
            t = pj.read_json(io.BytesIO(text), read_options=pj.ReadOptions(use_threads=False, block_size=len(text) + 1),
                             parse_options=pj.ParseOptions(explicit_schema=self.schema,
                                                           unexpected_field_behavior="error"))
            if t.num_rows == len(idx):
                return [(t, idx)], []
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
        if len(idx) <= _MIN_SPLIT:
            return [], list(idx)
        half = len(idx) // 2
        a, ra = self._read(lines, idx[:half])
        b, rb = self._read(lines, idx[half:])
        return a + b, ra + rb

    # ---------------------------------------------------------------------------------- columns
    def _columns(self, t, line: np.ndarray) -> tuple[Records, np.ndarray]:
        """Records of an arrow table (one row per line); also the rows handed to the per-line path."""
        import pyarrow.compute as pc

        n = t.num_rows
        visits = t.column("visits").combine_chunks()
        n_vis = pc.list_value_length(visits).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        back = n_vis == 0                                        # schema error: the per-line path says it
        prof = np.zeros((n, len(self.fields)), np.int32)
        prof_unknown: list[tuple[int, str, str]] = []
        n_prof_unknown = np.zeros(n, np.int64)
        pcol = t.column("profile").combine_chunks()
        for k, name in enumerate(self.fields):
            col = pc.struct_field(pcol, name)
            at = pc.index_in(col, value_set=self.prof_values[name]).to_numpy(zero_copy_only=False)
            present = col.is_valid().to_numpy(zero_copy_only=False)
            miss = present & np.isnan(at)
            prof[:, k] = np.where(np.isnan(at), self.prof_unknown[name], np.nan_to_num(at)).astype(np.int32)
            for r in np.flatnonzero(miss).tolist():
                prof_unknown.append((r, name, col[r].as_py()))
            n_prof_unknown += miss
        back |= n_prof_unknown > 1
        if back.any():
            keep = np.flatnonzero(~back)
            rec, _ = self._columns(t.take(keep), line[keep])
            return rec, np.flatnonzero(back)
        ids = t.column("id").to_pylist()
        ids = [f"line{ln}" if x is None else x for x, ln in zip(ids, line.tolist())]

        vstruct = visits.flatten()
        n_v = len(vstruct)
        vpat = np.repeat(np.arange(n), n_vis)
        vfirst = np.cumsum(n_vis) - n_vis
        vlocal = np.arange(n_v) - vfirst[vpat]
        last = np.zeros(n_v, bool)
        last[vfirst + n_vis - 1] = True
        unknown: list[tuple] = []            # (patient, visit, field order, seq, entry)
        toks = {}
        for fo, f in enumerate(FIELDS):
            lists = pc.struct_field(vstruct, f)
            cnt = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            codes = pc.list_flatten(lists)
            cvis = np.repeat(np.arange(n_v), cnt)
            if f == "medications":                  # the current visit's drugs are the target: unused
                use = ~last[cvis]
                codes = codes.filter(use)
                cvis = cvis[use]
            at = pc.index_in(codes, value_set=self.keys[f]).fill_null(-1).to_numpy(zero_copy_only=False)
            tok = np.where(at >= 0, self.key_ids[f][at], 0)
            miss_sets = np.unique(cvis[at < 0])
            if len(miss_sets):                      # a set with a code not found as is: resolve it per code
                in_miss = np.isin(cvis, miss_sets)
                rows = np.flatnonzero(in_miss)
                extra_vis, extra_tok = [], []
                index = self.vocab.index(VOCAB_OF[f])
                for v, c in zip(cvis[rows].tolist(), codes.take(rows).to_pylist()):
                    c = c.strip()
                    got, why = self.resolver.resolve(f, c)
                    if got is None:
                        unknown.append((int(vpat[v]), int(vlocal[v]), fo, len(unknown),
                                        {"visit": int(vlocal[v]), "field": f, "code": c, "reason": why}))
                    else:
                        extra_vis.append(v)
                        extra_tok.append(index[got] + 1)
                keep = ~in_miss
                cvis = np.concatenate([cvis[keep], np.asarray(extra_vis, np.int64)])
                tok = np.concatenate([tok[keep], np.asarray(extra_tok, np.int64)])
                order = np.argsort(cvis, kind="stable")
                cvis, tok = cvis[order], tok[order]
            key = cvis * self.n_tok[f] + tok               # first appearance of each token in its set
            first = _first_occurrence(key)
            toks[f] = (cvis[first], tok[first])
        known = sum(np.bincount(toks[f][0], minlength=n_v) for f in FIELDS)
        dropped = ~last & (known == 0)
        cur_known = (np.bincount(toks["diagnoses"][0], minlength=n_v) + np.bincount(toks["procedures"][0], minlength=n_v))
        ok = cur_known[vfirst + n_vis - 1] > 0

        # ---- per-record texts: unknown_codes, dropped_visits (rare; "[]" otherwise)
        unknown_txt = ["[]"] * n
        if unknown or prof_unknown:
            per: dict[int, list] = {}
            for r, v, fo, seq, e in sorted(unknown, key=lambda u: u[:4]):
                per.setdefault(r, []).append(e)
            for r, name, val in prof_unknown:
                per.setdefault(r, []).append({"field": f"profile.{name}", "code": val,
                                              "reason": f"value not seen in training; encoded as {UNKNOWN!r}"})
            for r, entries in per.items():
                unknown_txt[r] = json.dumps(entries, ensure_ascii=False)
        dropped_txt = ["[]"] * n
        if dropped.any():
            dv = np.flatnonzero(dropped)
            per_d: dict[int, list] = {}
            for r, v in zip(vpat[dv].tolist(), vlocal[dv].tolist()):
                per_d.setdefault(r, []).append(v)
            for r, vs in per_d.items():
                dropped_txt[r] = json.dumps(vs)
        kind = np.where(ok, OK, NO_PREDICTION).astype(np.int8)
        text = ["" if o else NO_KNOWN_CODE for o in ok.tolist()]
        enc = self._encode_columns(ok, n_vis, vpat, dropped, toks, prof, ids)
        return Records(line.astype(np.int64), kind, ids, text, unknown_txt, dropped_txt, enc=enc), back

    # --------------------------------------------------------------------------------- encoding
    def _encode_columns(self, ok, n_vis, vpat, dropped, toks, prof, ids):
        """The student's `EncodedSplit` of the OK patients: what `encode_samples` gives for their
        samples (the last `max_visits` kept visits, drug stream shifted by one visit, no target)."""
        from leader_jax.train.student_inputs import EncodedSplit

        n_pat = len(ok)
        rows_ok = np.flatnonzero(ok)
        new_row = np.full(n_pat, -1, np.int64)
        new_row[rows_ok] = np.arange(len(rows_ok))
        kept_v = ~dropped & ok[vpat]
        kv = np.flatnonzero(kept_v)
        kpat = vpat[kv]
        n_kept = np.bincount(kpat, minlength=n_pat)
        kfirst = np.cumsum(n_kept) - n_kept
        rank = np.full(len(vpat), -1, np.int64)
        rank[kv] = np.arange(len(kv)) - kfirst[kpat]
        tail = np.maximum(n_kept - self.max_visits, 0)
        slot = np.where(rank >= 0, rank - tail[vpat], -1)       # visit slot in the encoding (-1: not kept)
        n_visits = (n_kept - tail)[rows_ok]
        n, mv = len(rows_ok), self.max_visits
        arrays, needs = {}, []
        for f in FIELDS:
            cvis, tok = toks[f]
            s = slot[cvis]
            if f == "medications":                            # drugs of kept visit j feed slot j + 1
                s = s + 1
                use = (slot[cvis] >= 0) & (s < (n_kept - tail)[vpat[cvis]])
            else:
                use = s >= 0
            cvis, tok, s = cvis[use], tok[use], s[use]
            r = new_row[vpat[cvis]]
            set_key = r * (mv + 1) + s                          # tokens are grouped by set, in order
            starts = np.flatnonzero(np.r_[True, set_key[1:] != set_key[:-1]]) if len(set_key) else np.zeros(0, np.int64)
            lens = np.diff(np.r_[starts, len(set_key)])
            pos = np.arange(len(set_key)) - np.repeat(starts, lens)
            width = max(int(lens.max(initial=0)), 1)
            out = np.zeros((n, mv, width), np.int32)
            out[r, s, pos] = tok
            need = np.zeros(n, np.int64)
            if len(starts):
                np.maximum.at(need, r[starts], lens)
            arrays[_STREAM[f]] = out
            needs.append(need)
        single = n_kept[rows_ok] == 1
        return EncodedSplit(ids=np.asarray([ids[i] for i in rows_ok.tolist()], dtype=str), diag=arrays["diag"],
                            proc=arrays["proc"], med=arrays["med"], n_visits=n_visits.astype(np.int32),
                            profile=prof[rows_ok], target=np.zeros((n, 1), np.int32),
                            labels=np.zeros((n, self.vocab.n_med), np.uint8), single_visit=single,
                            needs=np.stack([n_visits, *needs], axis=1).astype(np.int32))

    def _encode_samples(self, samples):
        from leader_jax.train.student_inputs import encode_samples
        return encode_samples(samples, self.vocab, self.max_visits)


def _first_occurrence(key: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each value of `key`, in order (a hash pass)."""
    if len(key) == 0:
        return np.zeros(0, np.int64)
    import pandas as pd
    return np.flatnonzero(~pd.Series(key).duplicated().to_numpy())


def merge(parts: Sequence[Records]) -> Records:
    """One `Records` of several, ordered by line number (their OK encodings merged the same way)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Records(np.zeros(0, np.int64), np.zeros(0, np.int8), [], [], [], [])
    if len(parts) == 1:
        return parts[0]
    line = np.concatenate([p.line for p in parts])
    order = np.argsort(line, kind="stable")
    kind = np.concatenate([p.kind for p in parts])
    pick = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
    lists = {k: [v[i] for i in order.tolist()] for k, v in
             (("ids", pick("ids")), ("text", pick("text")), ("unknown", pick("unknown")), ("dropped", pick("dropped")))}
    ok_line = np.concatenate([p.line[p.kind == OK] for p in parts])
    ok_order = np.argsort(ok_line, kind="stable")
    enc = concat_encoded([p.enc for p in parts], ok_order)
    return Records(line[order], kind[order], enc=enc, **lists)


def concat_encoded(encs: Sequence, order: np.ndarray):
    """The rows of several `EncodedSplit`s in `order` (code arrays padded to the widest set)."""
    from leader_jax.train.student_inputs import EncodedSplit

    encs = [e for e in encs if e is not None and len(e)]
    if not encs:
        return None
    if len(encs) == 1:
        e = encs[0]
        return e if np.array_equal(order, np.arange(len(e))) else _take(e, order)
    fields = {}
    for f in ("diag", "proc", "med", "target"):
        width = max(getattr(e, f).shape[-1] for e in encs)
        fields[f] = np.concatenate([_pad_last(getattr(e, f), width) for e in encs])[order]
    for f in ("ids", "n_visits", "profile", "labels", "single_visit", "needs"):
        fields[f] = np.concatenate([getattr(e, f) for e in encs])[order]
    return EncodedSplit(**fields)


def _take(e, rows):
    return dataclasses.replace(e, **{f: getattr(e, f)[rows] for f in
                                     ("ids", "diag", "proc", "med", "n_visits", "profile", "target", "labels",
                                      "single_visit", "needs")})


def _pad_last(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[-1] == width:
        return a
    out = np.zeros(a.shape[:-1] + (width,), a.dtype)
    out[..., : a.shape[-1]] = a
    return out
