"""Output text of `python -m leader_jax.predict`, rendered a chunk at a time without per-drug Python work.

Every record is a sequence of text pieces taken from tables built once per run: the JSON prefix of
each drug (`{"code": ..., "name": ..., "probability": `, with and without a leading `, `), the
probability digits (a probability rounded to 7 decimals is k / 10⁷, written as Python's `repr` writes
it: `0.` + the 7 digits of k without trailing zeros, or `repr` itself below 10⁻⁴) and each interacting
pair of the DDI graph. The pieces of a whole chunk are laid out with numpy (offsets by cumulative
sums) and joined once, as UTF-8 bytes (what is written). Per record there is only the head (line, id) and the tail (unknown codes,
dropped visits); the drugs a DDI filter removed are written per record, as they are few.
"""
from __future__ import annotations

import json
from json.encoder import encode_basestring     # json.dumps(s, ensure_ascii=False) of a str

import numpy as np

from leader_jax import ddi_safety
from leader_jax.patient_columns import ERROR, NO_PREDICTION, OK, Records

PROB_DIGITS = 7          # probabilities are written rounded to this many decimals (|error| <= 5e-8)
_SCALE = 10 ** PROB_DIGITS


def _prob_tables() -> tuple[np.ndarray, np.ndarray]:
    """(head, tail) piece tables: the text of k / 10⁷ is head[a] + tail[b] (see `_prob_index`); tail
    ends with the `}` closing the drug's object."""
    t4 = [f"0.{i:04d}" for i in range(10000)]                                   # k = i·1000 + lo, lo > 0
    t4s = [("0." + f"{i:04d}".rstrip("0")) if i else "0.0" for i in range(10000)]  # lo = 0
    sci = [repr(k / _SCALE) for k in range(1000)]                               # k < 1000: repr's form
    head = _bytes_array(t4 + t4s + sci + ["1.0"])
    tail = _bytes_array(["}"] + [f"{i:03d}".rstrip("0") + "}" for i in range(1, 1000)])
    return head, tail


def _bytes_array(texts) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts] + [b""], dtype=object)[:-1]


def _prob_index(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hi, lo = np.divmod(k, 1000)
    a = np.where(lo == 0, 10000 + hi, hi)
    small = k < 1000
    a = np.where(small, 20000 + k, a)
    a = np.where(k >= _SCALE, 21000, a)
    b = np.where(small | (k >= _SCALE), 0, lo)
    return a, b


def _layout(n: int, columns: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Join the pieces of n records: column c gives counts[c][r] pieces to record r (its pieces flat, in
    record order); a record's pieces are its columns' pieces in column order."""
    counts = np.stack([np.asarray(c, np.int64) for c, _ in columns], axis=1)        # [n, C]
    col_off = np.cumsum(counts, axis=1) - counts
    per_rec = counts.sum(axis=1)
    rec_start = np.cumsum(per_rec) - per_rec
    out = np.empty(int(per_rec.sum()), dtype=object)
    for c, (cnt, pieces) in enumerate(columns):
        cnt = np.asarray(cnt, np.int64)
        if len(pieces) == 0:
            continue
        r = np.repeat(np.arange(n), cnt)
        local = np.arange(len(pieces)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        out[rec_start[r] + col_off[r, c] + local] = pieces
    return b"".join(out.tolist())


class Renderer:
    """Records + probabilities → output text, UTF-8 (one JSON object and a newline per record)."""

    def __init__(self, vocab, threshold: float, ddi, ddi_graph, cfg):
        self.m = m = vocab.n_med
        self.threshold, self.ddi, self.cfg = float(threshold), ddi, cfg
        self.k = m if cfg.top_k == 0 else min(int(cfg.top_k), m)
        self.filt = cfg.ddi_filter != "off" and ddi is not None
        names = vocab.names
        code = list(vocab.med)
        name = [names.get(t, t.partition(":")[2] or t) for t in code]
        drug = ['{"code": ' + json.dumps(c, ensure_ascii=False) + ', "name": ' + json.dumps(n, ensure_ascii=False)
                + ', "probability": ' for c, n in zip(code, name)]
        self.drug = drug
        self.drug_sep = _bytes_array(drug + [", " + d for d in drug])                  # j + m·(not first)
        self.prob_head, self.prob_tail = _prob_tables()
        pairs = np.full(m * m, "", dtype=object)                  # pair lo·m + hi → its JSON text
        if ddi is not None:
            for a, b in zip(*np.nonzero(np.triu(ddi_safety.symmetric(ddi), 1))):
                pairs[a * m + b] = json.dumps({"drugs": [code[a], code[b]], "names": [name[a], name[b]]},
                                              ensure_ascii=False)
        self.pair_text = pairs
        self.pair_sep = _bytes_array(pairs.tolist() + [", " + p for p in pairs])
        thr = repr(round(self.threshold, PROB_DIGITS))
        self.ok_head = ', "status": "ok", "threshold": ' + thr + ', "recommended": ['
        self.ddi_head = ('], "ddi": {"graph": ' + json.dumps(ddi_graph) + ', "pairs": [') if ddi is not None else ""
        self.filter_head = (', "ddi_filter": {"mode": ' + json.dumps(cfg.ddi_filter)
                            + (f', "strength": {float(cfg.ddi_penalty)!r}' if cfg.ddi_filter == "penalty" else "")
                            + ', "removed": [')

    def _entries(self, order, mask, rounded_rows):
        """Pieces (3 per drug) of the drugs `order[r, p]` where mask[r, p], rows in order, and the count
        per row. Probabilities from `rounded_rows` (float64, already rounded)."""
        r, p = np.nonzero(mask)
        j = order[r, p]
        per_row = mask.sum(axis=1)
        first = np.r_[True, r[1:] != r[:-1]] if len(r) else np.zeros(0, bool)
        k = np.rint(rounded_rows[r, j] * _SCALE).astype(np.int64)
        a, b = _prob_index(k)
        pieces = np.empty((len(r), 3), dtype=object)
        pieces[:, 0] = self.drug_sep[j + self.m * ~first]
        pieces[:, 1] = self.prob_head[a]
        pieces[:, 2] = self.prob_tail[b]
        return per_row * 3, pieces.reshape(-1)

    def render(self, rec: Records, probs: np.ndarray) -> bytes:
        """The text of every record of `rec` (probs: [n OK records, n_med], in order)."""
        n = len(rec)
        ok = rec.kind == OK
        n_ok = int(ok.sum())
        lines = rec.line.tolist()
        heads = []
        for i in range(n):
            ln = lines[i]
            pre = '{"line": ' + str(ln) + ", " if ln >= 0 else "{"
            kind = rec.kind[i]
            if kind == ERROR:
                heads.append(pre + '"status": "error", "error": ' + encode_basestring(rec.text[i]) + "}\n")
                continue
            head = pre + '"id": ' + encode_basestring(rec.ids[i])
            if kind == NO_PREDICTION:
                head += (', "status": "no_prediction", "reason": ' + json.dumps(rec.text[i]) + ', "unknown_codes": '
                         + rec.unknown[i] + ', "dropped_visits": ' + rec.dropped[i] + "}\n")
            heads.append(head)
        ones = ok.astype(np.int64)

        def const(text):
            return ones, np.full(n_ok, text.encode("utf-8"), dtype=object)

        columns = [(np.ones(n, np.int64), _bytes_array(heads))]
        if n_ok:
            safe = np.asarray(probs, dtype=np.float32)
            sets, scores = ddi_safety.filter_sets(safe, self.threshold, self.ddi, self.cfg.ddi_filter,
                                                  self.cfg.ddi_penalty)
            n_cand = (safe >= np.float32(self.threshold)).sum(axis=1)
            width = min(self.m, max(self.k, int(n_cand.max(initial=0))))
            order = ddi_safety.top_order(safe, width)               # [n, width] by probability, ties by index
            rounded = np.round(safe.astype(np.float64), PROB_DIGITS)
            pos = np.arange(width)[None, :]
            cand = pos < n_cand[:, None]
            rec_mask = cand & np.take_along_axis(sets, order, axis=1) if self.filt else cand
            rc, rp = self._entries(order, rec_mask, rounded)
            kc, kp = self._entries(order, np.broadcast_to(pos < self.k, cand.shape), rounded)
            columns += [const(self.ok_head), _spread(ok, rc, rp), const('], "ranked": ['), _spread(ok, kc, kp)]
            if self.ddi is None:
                columns.append(const('], "ddi": null'))
            else:
                starts, lo, hi = ddi_safety.pair_index(sets, self.ddi)
                cnt = np.diff(starts)
                first = np.zeros(len(lo), bool)
                first[starts[:-1][cnt > 0]] = True
                columns += [const(self.ddi_head),
                            _spread(ok, cnt, self.pair_sep[lo * self.m + hi + self.m * self.m * ~first]),
                            const("]}")]
            if self.filt:
                columns += [const(self.filter_head), _spread(ok, np.ones(n_ok, np.int64),
                                                              self._removed(order, cand, sets, rounded, scores)),
                            const("]}")]
            tails = [', "unknown_codes": ' + rec.unknown[i] + ', "dropped_visits": ' + rec.dropped[i] + "}\n"
                     for i in np.flatnonzero(ok).tolist()]
            columns.append((ones, _bytes_array(tails)))
        return _layout(n, columns)

    def _removed(self, order, cand, sets, rounded, scores) -> np.ndarray:
        """Per OK record: the text of the drugs the DDI filter removed (most probable first)."""
        out = np.full(len(order), b"", dtype=object)
        gone = cand & ~np.take_along_axis(sets, order, axis=1)
        for r in np.flatnonzero(gone.any(axis=1)).tolist():
            js = order[r][gone[r]].tolist()
            vals, sc = rounded[r], scores[r]
            out[r] = ", ".join([self.drug[j] + repr(float(vals[j])) + ', "score": '
                                + repr(round(float(sc[j]), PROB_DIGITS)) + "}" for j in js]).encode("utf-8")
        return out


def _spread(ok: np.ndarray, counts_ok: np.ndarray, pieces: np.ndarray):
    """A column over all records from counts of the OK records (the others get none)."""
    counts = np.zeros(len(ok), np.int64)
    counts[ok] = counts_ok
    return counts, pieces
