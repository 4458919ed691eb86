"""`python -m leader_jax.predict`: drug recommendations for new patients from a trained run.

    python -m leader_jax.predict --config.run_dir=RUN --config.input=patients.jsonl|MEDS_ROOT \
        [--config.out=recs.jsonl] [--config.top_k=10] [--config.threshold=val|0.5] \
        [--config.ddi_filter=off|drop_lower|penalty] [--config.ddi_penalty=0.25]

Input: one JSON object per line (schema in `leader_jax.patient_input` and docs/predict.md). Output: one
JSON object per non-blank input line, in input order (`leader_jax.recommender.Recommender.results`).
A malformed line gives an output record `{"line": N, "status": "error", "error": ...}` and a message on
stderr; every other line is still predicted and written, and the command then ends with exit status 2
naming the failed lines. The input is streamed in chunks of `chunk_size` lines, parsed and encoded
column-wise for student runs (`leader_jax.patient_columns`) and rendered by `leader_jax.predict_render`;
the model of the next chunk and the write of the previous one run in threads meanwhile. The output file
is written atomically.
A MEDS folder as input (`leader_jax.meds_input`): each subject's last visit is predicted, and the
records are those of the Python API (no line number).
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from leader_jax.cli import UserError
from leader_jax.ddi_safety import FILTERS

CHECKPOINTS = ("best", "last")
MEDS_SPLITS = ("", "train", "val", "test")


def _tmp_path(path: str) -> str:
    p = Path(path)
    return str(p.with_name(f".{p.name}.tmp"))


def validate_config(cfg: ConfigDict) -> None:
    """UserError naming the field for a value predict cannot use (files are checked when opened)."""
    from leader_jax.recommender import is_number

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise UserError(f"predict config {field}={cfg[field]!r}: {what}")

    thr = str(cfg.threshold).strip()
    need(thr == "val" or (is_number(thr) and 0 < float(thr) <= 1), "threshold",
         "expected 'val' (tuned on the run's validation predictions) or a number in (0, 1]")
    need(cfg.ddi_filter in FILTERS, "ddi_filter", f"expected one of {FILTERS}")
    need(isinstance(cfg.ddi_penalty, (int, float)) and not isinstance(cfg.ddi_penalty, bool)
         and cfg.ddi_penalty >= 0, "ddi_penalty", "must be a number >= 0")
    for name, lo in (("top_k", 0), ("batch_size", 1), ("chunk_size", 1)):
        need(isinstance(cfg[name], int) and not isinstance(cfg[name], bool) and cfg[name] >= lo, name,
             f"must be an integer >= {lo}")
    need(cfg.meds_split in MEDS_SPLITS, "meds_split", f"expected one of {MEDS_SPLITS} ('' = every subject)")
    from leader_jax.data.prepare import validate_meds
    validate_meds(cfg.meds)
    need(cfg.teacher_checkpoint in CHECKPOINTS, "teacher_checkpoint", f"expected one of {CHECKPOINTS}")
    mesh = tuple(cfg.mesh)
    need(len(mesh) == 3 and all(isinstance(s, int) and (s >= 1 or s == -1) for s in mesh), "mesh",
         "expected a (data, fsdp, tensor) tuple of positive sizes (or -1 = the remaining devices)")


def run_predict(cfg: ConfigDict, recommender=None, overlap: bool = True) -> dict:
    """Predict every line of `cfg.input` into `cfg.out` (or stdout); returns counts. Raises UserError
    after writing everything when some lines failed. overlap=True: chunk i + 1 is read and parsed, and
    chunk i rendered, while a thread runs the model on chunk i + 1 and another writes chunk i − 1 (the
    model and the writes release the GIL); False: one stage at a time (same bytes; benchmarks)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from leader_jax.meds_input import is_meds_folder, read_patients
    from leader_jax.patient_columns import ERROR, NO_PREDICTION, OK, records_from_parsed
    from leader_jax.recommender import Recommender

    validate_config(cfg)
    if not cfg.run_dir:
        raise UserError("set --config.run_dir=RUN (a finished student or teacher run)")
    if not cfg.input:
        raise UserError("set --config.input=patients.jsonl (one patient per line; '-' = stdin) or a MEDS folder")
    meds = is_meds_folder(cfg.input)
    if cfg.input != "-" and not meds and not Path(cfg.input).is_file():
        raise UserError(f"input file not found: {cfg.input}")
    rec = recommender or Recommender.load(cfg.run_dir, cfg)
    t0 = time.perf_counter()
    counts = {"lines": 0, "ok": 0, "no_prediction": 0, "error": 0}
    failed: list[int] = []
    if meds:
        patients = read_patients(cfg.input, cfg.meds, rec.visit_order, cfg.meds_split)
        src = iter([patients[i:i + cfg.chunk_size] for i in range(0, len(patients), cfg.chunk_size)])
    else:
        src = sys.stdin if cfg.input == "-" else open(cfg.input, encoding="utf-8")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    if not cfg.out:
        sys.stdout.flush()
    out = open(_tmp_path(cfg.out), "wb") if cfg.out else sys.stdout.buffer

    def chunks():
        """The records of each input chunk, in order."""
        if meds:                       # MEDS subjects: records without a line number
            for chunk in src:
                yield records_from_parsed(rec.parse(chunk), lines=False)
            return
        first = 1
        while lines := list(itertools.islice(src, cfg.chunk_size)):
            yield rec.parse_chunk(lines, first_line=first)
            first += len(lines)

    def count(records) -> None:
        kind = records.kind
        for i in np.flatnonzero(kind == ERROR).tolist():
            failed.append(int(records.line[i]))
            print(f"error: {records.text[i]}", file=sys.stderr)
        counts["error"] += int((kind == ERROR).sum())
        counts["ok"] += int((kind == OK).sum())
        counts["no_prediction"] += int((kind == NO_PREDICTION).sum())
        counts["lines"] += len(records)

    def done(value) -> Future:
        f = Future()
        f.set_result(value)
        return f

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="predict-model") as model, \
                ThreadPoolExecutor(1, thread_name_prefix="predict-write") as writer:
            pending, written = None, done(None)

            def finish(records, probs: Future) -> Future:
                text = rec.renderer.render_view(records, probs.result())
                written.result()                      # at most one chunk waits to be written
                count(records)
                return writer.submit(out.write, text) if overlap else done(out.write(text))

            for records in chunks():
                probs = model.submit(rec.records_proba, records) if overlap else done(rec.records_proba(records))
                if pending is not None:
                    written = finish(*pending)
                pending = (records, probs)
            if pending is not None:
                written = finish(*pending)
            written.result()
        if cfg.out:
            out.close()
            os.replace(_tmp_path(cfg.out), cfg.out)        # atomic: the output appears complete or not at all
        else:
            out.flush()
    finally:
        if hasattr(src, "close") and src is not sys.stdin:
            src.close()
        if cfg.out and not out.closed:
            out.close()
            Path(_tmp_path(cfg.out)).unlink(missing_ok=True)
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (", …" if len(failed) > 10 else "")
        raise UserError(f"{len(failed)} of {counts['lines']} input line(s) failed (line {shown}) and were "
                        f"written as error records; the other {counts['lines'] - len(failed)} were predicted"
                        + (f" into {cfg.out}" if cfg.out else ""))
    return counts


def main(cfg: ConfigDict, args: list[str]) -> None:
    if args:
        raise UserError(f"unexpected positional arguments: {args}")
    counts = run_predict(cfg)
    where = cfg.out or "stdout"
    print(f"predicted {counts['ok']} patient(s), {counts['no_prediction']} without a prediction "
          f"(no known code in the current visit) → {where}", file=sys.stderr)


if __name__ == "__main__":
    from leader_jax.cli import run
    run(main, "predict.py", out_flag=False)
