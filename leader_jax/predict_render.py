"""Output text of `python -m leader_jax.predict`, rendered a chunk at a time without per-drug Python work.

Every record is a sequence of text pieces, each a row of one fragment table built once per run: the
JSON prefix of each drug (`{"code": ..., "name": ..., "probability": `, with and without a leading
`, `; code and name already escaped), the probability digits (a probability rounded to 7 decimals is
k / 10⁷, written as Python's `repr` writes it: `0.` + the 7 digits of k without trailing zeros, or
`repr` itself below 10⁻⁴, as a head and a tail piece), each interacting pair of the DDI graph, and the
constant separators. Per chunk, the table gets one head (up to the first recommended drug) and one
tail (DDI filter removals, unknown codes, dropped visits) per record: the only per-record Python work.
The row numbers of the chunk's pieces are laid out with numpy (offsets by cumulative sums), and one
arrow `take` copies the pieces, in order, into one buffer: the chunk's UTF-8 text, written as is.

`ReferenceRenderer` is the previous implementation (numpy object arrays of pieces and one
`bytes.join`); it is kept only as the reference the tests and scripts/bench_predict.py compare with.
"""
from __future__ import annotations

import json
from json.encoder import encode_basestring  # json.dumps(s, ensure_ascii=False) of a str

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


def _prob_rows(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_prob_index` of k = rint(p · 10⁷) (float64; = the scaled `np.round(p, 7)`), in int32 and with the
    rare cases (k < 1000, k = 10⁷) patched afterwards."""
    k = k.astype(np.int32)
    hi, lo = np.divmod(k, 1000)
    a = hi + 10000 * (lo == 0)
    odd = (k < 1000) | (k >= _SCALE)
    if odd.any():
        ko = k[odd]
        a[odd] = np.where(ko >= _SCALE, 21000, 20000 + ko)
        lo[odd] = 0
    return a, lo


def _top(p: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, values) [n, width]: per row the `width` largest values of `p`, largest first, ties by lower
    column (`ddi_safety.top_order`'s order). One int64 sort key per entry: the float32 bits (monotonic for
    values >= 0) above the column; other inputs (negative, NaN) go through `ddi_safety.top_order`."""
    m = p.shape[1]
    width = min(int(width), m)
    if not (p >= 0).all():
        order = ddi_safety.top_order(p, width)
        return order, np.take_along_axis(p, order, axis=1)
    bits = (p + np.float32(0)).view(np.int32)                  # + 0: -0.0 → 0.0
    key = (np.int64(0x7FFFFFFF) - bits.astype(np.int64)) << 32
    key |= np.arange(m, dtype=np.int64)
    if 4 * width < m:                                          # few of many: select, then sort those
        key = np.partition(key, width - 1, axis=1)[:, :width]
        key.sort(axis=1)
    else:
        key.sort(axis=1)
        key = key[:, :width]
    vals = (np.int64(0x7FFFFFFF) - (key >> 32)).astype(np.int32).view(np.float32)
    return key & 0xFFFFFFFF, vals


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


def drug_labels(vocab) -> tuple[list[str], list[str], list[str]]:
    """(codes, display names, JSON prefixes) per drug label; a prefix is the start of the drug's JSON
    object up to the probability value, code and name escaped once per run."""
    code = list(vocab.med)
    name = [vocab.names.get(c, c.partition(":")[2] or c) for c in code]
    prefix = ['{"code": ' + json.dumps(c, ensure_ascii=False) + ', "name": ' + json.dumps(n, ensure_ascii=False)
              + ', "probability": ' for c, n in zip(code, name)]
    return code, name, prefix


class _RendererSettings:
    """What both renderers read from the run: label count, θ, DDI matrix and filter, top-k, drug texts."""

    def _settings(self, vocab, threshold: float, ddi, cfg):
        self.m = m = vocab.n_med
        self.threshold, self.ddi, self.cfg = float(threshold), ddi, cfg
        self.k = m if cfg.top_k == 0 else min(int(cfg.top_k), m)
        self.filt = cfg.ddi_filter != "off" and ddi is not None
        code, name, self.drug = drug_labels(vocab)
        return m, code, name, self.drug


class ReferenceRenderer(_RendererSettings):
    """The previous renderer (numpy object arrays of pieces, one `bytes.join` per chunk), kept only as the
    reference the fast `Renderer` is tested and benchmarked against: same constructor, same bytes."""

    def __init__(self, vocab, threshold: float, ddi, ddi_graph, cfg):
        m, code, name, drug = self._settings(vocab, threshold, ddi, cfg)
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

    def render_view(self, rec: Records, probs: np.ndarray) -> memoryview:
        return memoryview(self.render(rec, probs))

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


class Renderer(_RendererSettings):
    """Records + probabilities → output text, UTF-8 (one JSON object and a newline per record).

    Every piece of text is a row of one fragment table: the static rows built here (drug prefixes with
    and without `, `, probability digits, DDI pairs, constant separators) followed, per chunk, by one
    head and one tail string per record. A chunk is an int64 array of row numbers computed with numpy,
    and its text is one arrow `take` of those rows, whose value buffer is the output, in order."""

    def __init__(self, vocab, threshold: float, ddi, ddi_graph, cfg):
        import pyarrow as pa

        m, code, name, drug = self._settings(vocab, threshold, ddi, cfg)
        frags: list[str] = []

        def add(texts) -> int:
            base = len(frags)
            frags.extend(texts)
            return base

        head, tail = _prob_tables()
        self.f_drug = add(drug)                                   # row f_drug + j: drug j, first in its list
        self.f_drug_sep = add([", " + d for d in drug])           # drug j after another one
        self.f_head = add([x.decode("utf-8") for x in head.tolist()])
        self.f_tail = add([x.decode("utf-8") for x in tail.tolist()])
        self.f_ranked = add(['], "ranked": ['])
        if ddi is not None:
            g_lo, g_hi = np.nonzero(np.triu(ddi_safety.symmetric(ddi), 1))     # the graph's pairs, sorted
            self.g_lo, self.g_hi = g_lo, g_hi
            pairs = [json.dumps({"drugs": [code[a], code[b]], "names": [name[a], name[b]]}, ensure_ascii=False)
                     for a, b in zip(g_lo.tolist(), g_hi.tolist())]
            self.f_pair = add(pairs)
            self.f_pair_sep = add([", " + p for p in pairs])
            self.f_ddi_head = add(['], "ddi": {"graph": ' + json.dumps(ddi_graph) + ', "pairs": ['])
        self.static = pa.array(frags, pa.large_string()).cast(pa.large_binary())
        thr = repr(round(self.threshold, PROB_DIGITS))
        self.ok_head = ', "status": "ok", "threshold": ' + thr + ', "recommended": ['
        self.after_pairs = "]}" if ddi is not None else '], "ddi": null'
        self.filter_head = (', "ddi_filter": {"mode": ' + json.dumps(cfg.ddi_filter)
                            + (f', "strength": {float(cfg.ddi_penalty)!r}' if cfg.ddi_filter == "penalty" else "")
                            + ', "removed": [')

    def render(self, rec: Records, probs: np.ndarray) -> bytes:
        """The text of every record of `rec` (probs: [n OK records, n_med], in order)."""
        return self.render_view(rec, probs).tobytes()

    def render_view(self, rec: Records, probs: np.ndarray) -> memoryview:
        """`render` without the final copy: a read-only view of the text (what the CLI writes)."""
        import pyarrow as pa

        n = len(rec)
        kind = rec.kind
        ok_rows = np.flatnonzero(kind == OK)
        n_ok = len(ok_rows)
        heads = self._heads(rec)
        count = np.ones(n, np.int64)                              # pieces per record
        if n_ok:
            safe = np.asarray(probs, dtype=np.float32)
            sets, scores = ddi_safety.filter_sets(safe, self.threshold, self.ddi, self.cfg.ddi_filter,
                                                  self.cfg.ddi_penalty)
            n_cand = np.count_nonzero(safe >= np.float32(self.threshold), axis=1)
            width = min(self.m, max(self.k, int(n_cand.max(initial=0))))
            order, vals = _top(safe, width)                       # [n, width] by probability, ties by index
            a, b = _prob_rows(np.rint(vals.astype(np.float64) * _SCALE))
            cand = np.arange(width)[None, :] < n_cand[:, None]
            rec_mask = cand & np.take_along_axis(sets, order, axis=1) if self.filt else cand
            n_rec = np.count_nonzero(rec_mask, axis=1)
            n_pairs = np.zeros(n_ok, np.int64)
            if self.ddi is not None:
                n_pairs, pid = self._pairs(sets)
            fixed = 3 + (self.ddi is not None)                    # head, "ranked" separator, [ddi head,] tail
            count[ok_rows] = fixed + 3 * n_rec + 3 * self.k + n_pairs
        start = np.cumsum(count) - count
        idx = np.empty(int(count.sum()), np.int32)             # fragment rows (the table is small)
        base = len(self.static)
        idx[start] = base + np.arange(n)                          # heads (whole lines for the others)
        tails = []
        if n_ok:
            s = start[ok_rows]
            j_row = order + self.f_drug_sep
            j_first = order[:, 0] + self.f_drug
            a += self.f_head
            b += self.f_tail
            flat = np.flatnonzero(rec_mask)                       # recommended: 3 pieces per drug
            first = np.cumsum(n_rec) - n_rec                      # each row's first entry in `flat`
            pos = 3 * np.arange(len(flat)) + np.repeat(s + 1 - 3 * first, n_rec)
            drug = j_row.ravel()[flat]
            drug[first[n_rec > 0]] -= self.f_drug_sep - self.f_drug
            idx[pos] = drug
            idx[pos + 1] = a.ravel()[flat]
            idx[pos + 2] = b.ravel()[flat]
            at = s + 1 + 3 * n_rec
            idx[at] = self.f_ranked
            k = self.k                                            # ranked: the first k of `order`
            pos = at[:, None] + 1 + 3 * np.arange(k)[None, :]
            first = j_row[:, :k].copy()
            first[:, 0] = j_first
            idx[pos] = first
            idx[pos + 1] = a[:, :k]
            idx[pos + 2] = b[:, :k]
            at = at + 1 + 3 * k
            if self.ddi is not None:
                idx[at] = self.f_ddi_head
                first = np.cumsum(n_pairs) - n_pairs
                pid += self.f_pair_sep
                pid[first[n_pairs > 0]] -= self.f_pair_sep - self.f_pair
                idx[np.arange(len(pid)) + np.repeat(at + 1 - first, n_pairs)] = pid
            idx[s + count[ok_rows] - 1] = base + n + np.arange(n_ok)
            removed = self._removed(order, cand, sets, safe, scores) if self.filt else None
            unknown, dropped = rec.unknown, rec.dropped
            pre = self.after_pairs
            for t, i in enumerate(ok_rows.tolist()):
                mid = (self.filter_head + removed[t] + "]}") if removed is not None else ""
                tails.append(pre + mid + ', "unknown_codes": ' + unknown[i] + ', "dropped_visits": ' + dropped[i] + "}\n")
        table = pa.concat_arrays([self.static, pa.array(heads + tails, pa.large_string()).cast(pa.large_binary())])
        got = table.take(pa.array(idx))
        offsets = np.frombuffer(got.buffers()[1], np.int64)[got.offset:got.offset + len(got) + 1]
        data = got.buffers()[2]
        if data is None or len(got) == 0:
            return memoryview(b"")
        return memoryview(data)[int(offsets[0]):int(offsets[-1])]

    def _pairs(self, sets: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(pairs per row, the pairs' numbers in the graph, rows in order): the interacting pairs left in
        each kept set, as `ddi_safety.pair_index` finds them (row chunks bound the [rows, pairs] mask)."""
        n_pairs = len(self.g_lo)
        counts, ids = [], []
        for a in range(0, len(sets), chunk):
            s = sets[a:a + chunk]
            hit = np.take(s, self.g_lo, axis=1) & np.take(s, self.g_hi, axis=1)
            cnt = np.count_nonzero(hit, axis=1)
            counts.append(cnt)
            ids.append(np.flatnonzero(hit) - n_pairs * np.repeat(np.arange(len(s)), cnt))
        return np.concatenate(counts), np.concatenate(ids)

    def _heads(self, rec: Records) -> list[str]:
        """Per record: the text up to its first recommended drug (OK), or the whole line (the others)."""
        heads = []
        lines, kinds, ids, texts = rec.line.tolist(), rec.kind.tolist(), rec.ids, rec.text
        ok_head = self.ok_head
        for i, ln in enumerate(lines):
            pre = '{"line": ' + str(ln) + ", " if ln >= 0 else "{"
            kind = kinds[i]
            if kind == OK:
                heads.append(pre + '"id": ' + encode_basestring(ids[i]) + ok_head)
            elif kind == ERROR:
                heads.append(pre + '"status": "error", "error": ' + encode_basestring(texts[i]) + "}\n")
            else:
                heads.append(pre + '"id": ' + encode_basestring(ids[i]) + ', "status": "no_prediction", "reason": '
                             + json.dumps(texts[i]) + ', "unknown_codes": ' + rec.unknown[i]
                             + ', "dropped_visits": ' + rec.dropped[i] + "}\n")
        return heads

    def _removed(self, order, cand, sets, safe, scores) -> list[str]:
        """Per OK record: the text of the drugs the DDI filter removed (most probable first)."""
        out = [""] * len(order)
        gone = cand & ~np.take_along_axis(sets, order, axis=1)
        for r in np.flatnonzero(gone.any(axis=1)).tolist():
            js = order[r][gone[r]].tolist()
            vals, sc = np.round(safe[r].astype(np.float64), PROB_DIGITS), scores[r]
            out[r] = ", ".join([self.drug[j] + repr(float(vals[j])) + ', "score": '
                                + repr(round(float(sc[j]), PROB_DIGITS)) + "}" for j in js])
        return out
