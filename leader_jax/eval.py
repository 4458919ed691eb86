"""`python -m leader_jax.eval`: score a run's predictions, and compare runs side by side.

    python -m leader_jax.eval --config configs/eval.py --config.run_dir=RUN [--config.split=test]
    python -m leader_jax.eval --compare RUN_A RUN_B ...   [--config.split=test]

Reads `RUN/predictions/<split>.npz` (the format every model writes, see `write_predictions`) and
`RUN/run.json` → `data_dir` (prepared data: drug vocabulary and DDI matrix). Writes
`RUN/eval/<split>.json` (metrics.summarize structure + a validation-tuned threshold section),
`RUN/eval/<split>.md` and PNG plots (`<split>_groups.png`, `<split>_calibration.png`,
`<split>_drug_f1.png`). The tuned threshold is chosen on `predictions/<val_split>.npz` only.

Every predictions file is checked against the prepared data before it is scored (`check_predictions`):
the exact id set of the split, `y_true` equal to the prepared labels, the single-visit flags, and the
prepared data's fingerprint when the file records one. A model's own labels are never trusted. Rows in
another order are put back into the prepared split's order (ids are checked exactly, so this is
lossless), so that every model's rounds draw the same samples.
"""
from __future__ import annotations

import json
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ml_collections import ConfigDict

from leader_jax import metrics as M
from leader_jax.cli import UserError
from leader_jax.io import atomic_save_npz, atomic_write_bytes, atomic_write_json, atomic_write_text, load_npz

PRED_KEYS = ("ids", "y_true", "y_prob", "single_visit")
SPLITS = ("train", "val", "test")
DDI_GRAPH_NOTE = "TWOSIDES ATC-3, legacy TOPK=40 (least-frequent) selection"


# ---------------------------------------------------------------- prediction files (shared format)

def write_predictions(run_dir: str | Path, split: str, *, ids, y_true, y_prob, single_visit,
                      data_fingerprint: str | None = None) -> Path:
    """Write `RUN/predictions/<split>.npz` in the project format (checked, atomic). `data_fingerprint`
    (`PreparedData.fingerprint()` of the data the predictions were made on) lets eval refuse predictions
    scored against another prepared folder."""
    ids = np.asarray([str(i) for i in ids])
    arrays = {"ids": ids, "y_true": np.asarray(y_true).astype(np.uint8),
              "y_prob": np.asarray(y_prob).astype(np.float32),
              "single_visit": np.asarray(single_visit).astype(bool)}
    if data_fingerprint is not None:
        arrays["data_fingerprint"] = np.asarray(str(data_fingerprint))
    path = Path(run_dir) / "predictions" / f"{split}.npz"
    _validate(arrays, path)
    return atomic_save_npz(path, **arrays)


def _validate(arr: dict[str, np.ndarray], path: Path) -> None:
    missing = [k for k in PRED_KEYS if k not in arr]
    if missing:
        raise UserError(f"{path}: missing array(s) {missing}; expected {list(PRED_KEYS)}")
    n = arr["ids"].shape[0]
    yt, yp, sv = arr["y_true"], arr["y_prob"], arr["single_visit"]
    if yt.ndim != 2 or yp.shape != yt.shape or yt.shape[0] != n or sv.shape != (n,):
        raise UserError(f"{path}: inconsistent shapes ids {arr['ids'].shape}, y_true {yt.shape}, "
                        f"y_prob {yp.shape}, single_visit {sv.shape}")
    if n == 0:
        raise UserError(f"{path}: holds no samples")
    bad = (yt != 0) & (yt != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(f"{path}: y_true must be 0/1; sample {arr['ids'][r]!s} column {c} holds {yt[r, c]}")
    ok = np.isfinite(yp) & (yp >= 0) & (yp <= 1)
    if not ok.all():
        r, c = np.argwhere(~ok)[0]
        raise UserError(f"{path}: y_prob must be probabilities in [0, 1]; sample {arr['ids'][r]!s} "
                        f"column {c} holds {yp[r, c]}")
    if len(set(arr["ids"].tolist())) != n:
        raise UserError(f"{path}: sample ids are not unique")
    fp = arr.get("data_fingerprint")
    if fp is not None and (fp.shape != () or fp.dtype.kind not in "US"):
        raise UserError(f"{path}: data_fingerprint must be one string, got {fp.dtype} {fp.shape}")


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """Load and check a predictions file (pickle disabled); errors name the file and the value."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file not found: {path}")
    try:
        arr = load_npz(path)
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        # a truncated or corrupt file: zipfile/zlib errors become one line naming the file
        raise UserError(f"{path}: not a readable .npz predictions file (truncated or corrupt? "
                        f"{type(e).__name__}: {e})") from None
    _validate(arr, path)
    arr["ids"] = arr["ids"].astype(str)
    arr["single_visit"] = arr["single_visit"].astype(bool)
    return arr


def read_run_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def open_run(run_dir: str | Path, kinds, purpose: str) -> tuple[Path, dict[str, Any]]:
    """(run folder, run.json) of a run whose `model` is one of `kinds`; UserError naming the folder or
    the model kind otherwise (`purpose` completes the message, e.g. "a model card is written for ...")."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    meta = read_run_json(run)
    if meta.get("model") not in kinds:
        raise UserError(f"{run / 'run.json'}: model {meta.get('model')!r}; {purpose}")
    return run, meta


# ---------------------------------------------------------------- dataset side (vocab, DDI, labels)

def load_prepared(data_dir: str | Path):
    """`PreparedData.load` with errors as UserError naming the folder."""
    from leader_jax.data.dataset import PreparedData  # imported late: the data stage is heavy

    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"prepared data folder not found: {data_dir} (from run.json data_dir or --config.data_dir)")
    try:
        return PreparedData.load(data_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"cannot load prepared data {data_dir}: {e}") from None


def _examples(ids: list[str], k: int = 3) -> str:
    return ", ".join(repr(i) for i in ids[:k]) + (", …" if len(ids) > k else "")


def check_predictions(pred: dict[str, np.ndarray], data, split: str, path: Path, data_dir: str | Path,
                      fingerprint: Callable[[], str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Check a predictions file against the prepared data it claims to score; returns the arrays in
    the prepared split's order and what was checked. Raises UserError naming `path` and what differs:
    the recorded data fingerprint (`fingerprint()` is called only when the file records one), the
    drug count, the id set (missing / foreign ids), y_true against `data.labels`, single_visit.
    A file without a fingerprint (written by an older version) is accepted with a warning."""
    where = f"{path} (checked against the {split!r} split of {data_dir})"
    recorded = pred.get("data_fingerprint")
    if recorded is None:
        warnings.warn(f"{path}: records no data fingerprint (written by an older version); cannot confirm "
                      f"it was made on this prepared data; re-run the model to record one", stacklevel=2)
        fp_status = "not recorded"
    else:
        current = fingerprint()
        if str(recorded) != current:
            raise UserError(f"{where}: the predictions were made on prepared data with fingerprint "
                            f"{str(recorded)[:16]}…, but this folder's fingerprint is {current[:16]}…; "
                            "re-run the model on this data, or point run.json data_dir at the data it used")
        fp_status = "match"
    n_med = data.vocab.n_med
    if pred["y_true"].shape[1] != n_med:
        raise UserError(f"{where}: {pred['y_true'].shape[1]} drug columns, but the prepared vocabulary has {n_med}")
    samples = data.splits.get(split, [])
    want = [s.id for s in samples]
    got = pred["ids"].tolist()
    pos = {i: k for k, i in enumerate(got)}
    missing = [i for i in want if i not in pos]
    known = set(want)
    foreign = [i for i in got if i not in known]
    if missing or foreign:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the split's {len(want)} sample(s) missing, e.g. {_examples(missing)}")
        if foreign:
            parts.append(f"{len(foreign)} sample id(s) are not in the prepared data's {split!r} split, "
                         f"e.g. {_examples(foreign)}")
        raise UserError(f"{where}: " + "; ".join(parts))
    order = np.fromiter((pos[i] for i in want), dtype=np.int64, count=len(want))
    reordered = bool((order != np.arange(len(want))).any())
    if reordered:
        pred = {k: (v[order] if k in PRED_KEYS else v) for k, v in pred.items()}
    try:
        y = data.labels(samples)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    bad = np.flatnonzero((pred["y_true"] != y).any(axis=1))
    if bad.size:
        raise UserError(f"{where}: y_true differs from the prepared labels for {bad.size} of {len(want)} "
                        f"sample(s), e.g. {_examples([want[i] for i in bad])}")
    sv = np.array([s.single_visit for s in samples], dtype=bool)
    bad = np.flatnonzero(pred["single_visit"] != sv)
    if bad.size:
        raise UserError(f"{where}: single_visit differs from the prepared data for {bad.size} of {len(want)} "
                        f"sample(s), e.g. {_examples([want[i] for i in bad])}")
    return pred, {"file": str(path), "n": len(want), "data_fingerprint": fp_status, "reordered": reordered}


# ---------------------------------------------------------------- evaluation

def validate_config(cfg: ConfigDict) -> None:
    """Raise UserError on a bad eval setting (the run folder itself is checked when it is used)."""
    def bad(field, value, want):
        raise UserError(f"eval config: --config.{field}={value!r} is invalid; {want}")

    for f in ("split", "val_split"):
        if cfg[f] not in SPLITS:
            bad(f, cfg[f], f"choose one of {list(SPLITS)}")
    for f in ("run_dir", "data_dir"):
        if not isinstance(cfg[f], str):
            bad(f, cfg[f], "expected a folder path (a string)")
    for f in ("require_data", "tune_threshold", "plots"):
        if not isinstance(cfg[f], bool):
            bad(f, cfg[f], "expected True or False")
    if not isinstance(cfg.threshold, (int, float)) or isinstance(cfg.threshold, bool) or not 0 < cfg.threshold <= 1:
        bad("threshold", cfg.threshold, "a drug is predicted when p >= threshold: use 0 < threshold <= 1")
    step = cfg.threshold_step
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step <= 0.5:
        bad("threshold_step", step, "use 0 < threshold_step <= 0.5 (the tuning grid is step, 2·step, …, < 1)")
    for f, lo in (("rounds", 0), ("seed", 0), ("n_top_drugs", 1)):
        if not isinstance(cfg[f], int) or isinstance(cfg[f], bool) or cfg[f] < lo:
            bad(f, cfg[f], f"expected an integer >= {lo}")
    if not isinstance(cfg.fraction, (int, float)) or isinstance(cfg.fraction, bool) or not 0 < cfg.fraction <= 1:
        bad("fraction", cfg.fraction, "the share of samples drawn per round: use 0 < fraction <= 1")


def evaluate_run(cfg: ConfigDict) -> dict[str, Any]:
    """Evaluate one run directory; writes RUN/eval/<split>.{json,md} and plots; returns the JSON dict.
    Every predictions file read is first checked against the prepared data (`check_predictions`)."""
    validate_config(cfg)
    if not cfg.run_dir:
        raise UserError("set --config.run_dir=RUN (the run folder holding predictions/<split>.npz)")
    run = Path(cfg.run_dir)
    split = cfg.split
    pred_path = run / "predictions" / f"{split}.npz"
    pred = read_predictions(pred_path)
    meta = read_run_json(run)
    data_dir = cfg.data_dir or meta.get("data_dir")
    data = info = None
    checks: dict[str, Any] = {}
    if data_dir:
        data = load_prepared(data_dir)
        info = {"dataset": data.dataset, "med": list(data.vocab.med), "names": dict(data.vocab.names)}
        fingerprint_cache: list[str] = []

        def fingerprint() -> str:          # hashes every prepared file: computed at most once per eval
            if not fingerprint_cache:
                fingerprint_cache.append(data.fingerprint())
            return fingerprint_cache[0]

        pred, checks[split] = check_predictions(pred, data, split, pred_path, data_dir, fingerprint)
    elif cfg.require_data:
        raise UserError(f"{run / 'run.json'} names no data_dir; pass --config.data_dir=PREPARED "
                        "(needed for the drug vocabulary, the DDI matrix and the label check)")
    ddi = data.ddi if data is not None else None

    result = M.summarize(pred["y_true"], pred["y_prob"], threshold=cfg.threshold, ddi=ddi,
                         single_visit=pred["single_visit"], rounds=cfg.rounds, fraction=cfg.fraction,
                         seed=cfg.seed)
    result.update(run=str(run), split=split, model=meta.get("model"), data_dir=str(data_dir) if data_dir else None,
                  dataset=info["dataset"] if info else None, n_med=int(pred["y_true"].shape[1]),
                  ddi_graph=(DDI_GRAPH_NOTE if ddi is not None else None))
    result["tuned"] = None
    val_path = run / "predictions" / f"{cfg.val_split}.npz"
    if cfg.tune_threshold and split != cfg.val_split and val_path.is_file():
        val = read_predictions(val_path)
        if val["y_true"].shape[1] != pred["y_true"].shape[1]:
            raise UserError(f"{val_path}: {val['y_true'].shape[1]} drugs, but {split} has {pred['y_true'].shape[1]}")
        if data is not None:
            val, checks[cfg.val_split] = check_predictions(val, data, cfg.val_split, val_path, data_dir, fingerprint)
        t = M.best_threshold(val["y_true"], val["y_prob"], M.threshold_grid(cfg.threshold_step))
        tuned = M.summarize(pred["y_true"], pred["y_prob"], threshold=t, ddi=ddi,
                            single_visit=pred["single_visit"], rounds=cfg.rounds, fraction=cfg.fraction,
                            seed=cfg.seed)
        result["tuned"] = {"source": cfg.val_split, "threshold": t,
                           **{k: tuned[k] for k in ("overall", "single_visit", "multi_visit", "rounds")}}
    result["checks"] = checks or None

    out = run / "eval"
    atomic_write_json(out / f"{split}.json", result)
    plots = write_plots(out, split, pred, result, info, cfg.n_top_drugs) if cfg.plots else []
    atomic_write_text(out / f"{split}.md", report_markdown(result, plots))
    return result


# ---------------------------------------------------------------- reports

def _fmt(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pm(r: dict | None, digits=4) -> str:
    if not r or r.get("mean") is None:
        return "–"
    return f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}"


_COLS = (("jaccard", "Jaccard"), ("prauc", "PRAUC"), ("f1", "F1"), ("precision", "Precision"),
         ("recall", "Recall"), ("roc_auc", "ROC-AUC"), ("ddi_rate", "DDI rate"), ("avg_meds", "#meds"))


def _group_tables(res: dict[str, Any]) -> list[str]:
    lines = ["| group | n | " + " | ".join(c for _, c in _COLS) + " | DDI (truth) | #meds (truth) |",
             "|---|---:|" + "---:|" * (len(_COLS) + 2)]
    for g in M.GROUPS:
        r = res[g]
        lines.append(f"| {g} | {r['n']} | " + " | ".join(_fmt(r[k]) for k, _ in _COLS)
                     + f" | {_fmt(r['ddi_rate_true'])} | {_fmt(r['avg_true_meds'], 2)} |")
    return lines


def _check_lines(checks: dict[str, Any] | None) -> list[str]:
    if not checks:
        return ["- predictions NOT checked against prepared data (no data_dir; labels are the model's own)"]
    lines = []
    for split, c in checks.items():
        note = (f"- `{split}` predictions checked against the prepared data: ids ({c['n']}), labels and "
                f"single-visit flags match; data fingerprint {c['data_fingerprint']}")
        if c["reordered"]:
            note += "; rows were in another order and were put in the prepared split's order"
        lines.append(note)
    return lines


def report_markdown(res: dict[str, Any], plots: list[str]) -> str:
    rc = res["rounds_config"]
    lines = [f"# Evaluation: {res.get('model') or 'model'} on {res['split']}", "",
             f"- run: `{res['run']}`", f"- prepared data: `{res.get('data_dir')}` ({res.get('dataset')})",
             f"- samples: {res['n']}, drugs: {res['n_med']}",
             f"- threshold: predicted when p >= {res['threshold']:g}",
             f"- DDI graph: {res.get('ddi_graph') or 'none (DDI rate not defined)'}",
             f"- rounds: {rc['rounds']} draws of {rc['fraction']:.0%} without replacement, seed {rc['seed']}; "
             "mean ± std (ddof 0)"]
    lines += _check_lines(res.get("checks"))
    lines += ["", "## Point estimates (all samples of each group)", ""]
    lines += _group_tables(res)
    lines += ["", "## Rounds (mean ± std)", "",
              "| group | " + " | ".join(c for _, c in _COLS) + " |", "|---|" + "---:|" * len(_COLS)]
    for g in M.GROUPS:
        rr = res["rounds_by_group"][g]
        lines.append(f"| {g} | " + " | ".join(_pm(rr.get(k)) for k, _ in _COLS) + " |")
    t = res.get("tuned")
    if t:
        lines += ["", f"## Threshold tuned on {t['source']} (max mean Jaccard): p >= {t['threshold']:g}", ""]
        lines += _group_tables(t)
    else:
        lines += ["", "No validation predictions found: no tuned threshold (it is never tuned on test)."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def top_drugs(y_true: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` most frequent drugs of `y_true` (most frequent first, ties by index), count > 0."""
    freq = np.asarray(y_true).sum(axis=0, dtype=np.int64)     # signed: -freq must not wrap around
    top = np.argsort(-freq, kind="stable")[:n]
    return top[freq[top] > 0]


def write_plots(out: Path, split: str, pred, res, info, n_top: int) -> list[str]:
    """Per-group bars, calibration curve, per-drug F1 of the most frequent drugs; returns file names."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())
        names.append(name)

    keys = [("jaccard", "Jaccard"), ("prauc", "PRAUC"), ("f1", "F1"), ("roc_auc", "ROC-AUC")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.27
    for j, g in enumerate(M.GROUPS):
        rr = res["rounds_by_group"][g]
        means = [rr[k]["mean"] if rr[k]["mean"] is not None else 0.0 for k, _ in keys]
        stds = [rr[k]["std"] if rr[k]["std"] is not None else 0.0 for k, _ in keys]
        ax.bar(np.arange(len(keys)) + (j - 1) * w, means, w, yerr=stds, label=f"{g} (n={res[g]['n']})")
    ax.set_xticks(np.arange(len(keys)), [c for _, c in keys])
    ax.set_ylim(0, 1)
    ax.set_title(f"{split}: metrics by group (θ={res['threshold']:g}, mean ± std over rounds)")
    ax.legend(fontsize=8)
    save(fig, f"{split}_groups.png")

    cal = M.calibration_bins(pred["y_true"], pred["y_prob"], n_bins=10)
    ok = cal["count"] > 0
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot(cal["mean_prob"][ok], cal["frac_pos"][ok], "o-")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction of positives")
    ax.set_title(f"{split}: calibration (all sample × drug cells)")
    save(fig, f"{split}_calibration.png")

    freq = pred["y_true"].sum(axis=0, dtype=np.int64)
    top = top_drugs(pred["y_true"], n_top)
    f1 = M.per_drug_f1(pred["y_true"], M.predict_sets(pred["y_prob"], res["threshold"]))
    if info is not None:
        labels = [info["names"].get(info["med"][i], info["med"][i])[:28] for i in top]
    else:
        labels = [str(i) for i in top]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(top) + 1)))
    ax.barh(np.arange(len(top))[::-1], f1[top])
    ax.set_yticks(np.arange(len(top))[::-1], [f"{l} ({int(freq[i])})" for l, i in zip(labels, top)], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"F1 at θ={res['threshold']:g}")
    ax.set_title(f"{split}: per-drug F1, {len(top)} most frequent drugs (count)")
    save(fig, f"{split}_drug_f1.png")
    return names


# ---------------------------------------------------------------- comparison

def compare_runs(run_dirs: list[str], split: str = "test") -> str:
    """One markdown table, a row per run, from each RUN/eval/<split>.json (mean ± std over rounds)."""
    if not run_dirs:
        raise UserError("--compare needs at least one run folder")
    head = ["run", "model", "θ", "Jaccard", "PRAUC", "F1", "ROC-AUC", "DDI rate", "#meds",
            "PRAUC single", "PRAUC multi", "θ val", "Jaccard @θ val", "F1 @θ val"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * (len(head) - 3)]
    for rd in run_dirs:
        path = Path(rd) / "eval" / f"{split}.json"
        rerun = f"re-run `python -m leader_jax.eval --config.run_dir={rd} --config.split={split}`"
        if not path.is_file():
            raise UserError(f"{path} not found; {rerun} first")
        try:
            r = json.loads(path.read_text())
            lines.append("| " + " | ".join(_compare_row(Path(rd).name, r)) + " |")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); {rerun}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: not an eval result ({type(e).__name__}: {e}); {rerun}") from None
    return "\n".join(lines)


def _compare_row(name: str, r: dict[str, Any]) -> list[str]:
    rr, gr = r["rounds"], r["rounds_by_group"]
    t = r.get("tuned")
    return [name, str(r.get("model") or "–"), f"{r['threshold']:g}",
            _pm(rr["jaccard"]), _pm(rr["prauc"]), _pm(rr["f1"]), _pm(rr["roc_auc"]),
            _pm(rr["ddi_rate"]), _pm(rr["avg_meds"], 2),
            _pm(gr["single_visit"]["prauc"]), _pm(gr["multi_visit"]["prauc"]),
            f"{t['threshold']:g}" if t else "–",
            _pm(t["rounds"]["jaccard"]) if t else "–", _pm(t["rounds"]["f1"]) if t else "–"]


def main(cfg: ConfigDict, args: list[str]) -> None:
    from absl import flags

    validate_config(cfg)
    if flags.FLAGS.compare:
        print(compare_runs(args, cfg.split))
        return
    if args:
        raise UserError(f"unexpected arguments {args}; did you mean --compare?")
    res = evaluate_run(cfg)
    o = res["overall"]
    print(f"{res['run']} [{res['split']}] θ={res['threshold']:g}: Jaccard {_pm(res['rounds']['jaccard'])}, "
          f"PRAUC {_pm(res['rounds']['prauc'])}, F1 {_pm(res['rounds']['f1'])}, "
          f"DDI {_fmt(o['ddi_rate'])}, #meds {_fmt(o['avg_meds'], 2)} -> {res['run']}/eval/{res['split']}.md")
    for split, c in (res["checks"] or {}).items():
        if c["reordered"]:
            print(f"note: {c['file']} lists its rows in another order than the prepared {split!r} split; "
                  "they were put in the prepared order before scoring")


def run_cli(argv: list[str] | None = None) -> None:
    from absl import flags

    from leader_jax import cli

    if "compare" not in flags.FLAGS:
        flags.DEFINE_bool("compare", False, "print a side-by-side table of the run folders given as arguments")
    cli.run(main, "eval.py", out_flag=False, argv=argv)


if __name__ == "__main__":
    run_cli()
