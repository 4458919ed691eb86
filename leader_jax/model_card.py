"""RUN/model_card.md for a student or teacher run: data, label space, training config, metrics, use and limits.

    python -m leader_jax.model_card --config.run_dir=RUN [--config.evaluate=False]
    from leader_jax.model_card import write_model_card; write_model_card(RUN)   # end of a training run

Metrics come from the eval CLI's results, `RUN/eval/<split>.json`. When one is missing and
`evaluate=True`, it is computed in-process with the eval CLI's own `evaluate_run` (same checks and
definitions, no plots), which also writes `RUN/eval/<split>.{json,md}`; otherwise the card says how to
run the eval CLI.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from leader_jax.cli import UserError

COLS = (("jaccard", "Jaccard"), ("prauc", "PRAUC"), ("f1", "F1"), ("roc_auc", "ROC-AUC"),
        ("ddi_rate", "DDI rate"), ("avg_meds", "#meds"))
LABEL_SPACES = {"atc": "ATC level-3 classes (NDC → RxCUI → ATC-4 → ATC-3)", "hicl": "eICU HICL drug codes"}


def validate_config(cfg: ConfigDict) -> None:
    if not isinstance(cfg.run_dir, str):
        raise UserError(f"model_card config run_dir={cfg.run_dir!r}: expected a folder path")
    if not isinstance(cfg.evaluate, bool):
        raise UserError(f"model_card config evaluate={cfg.evaluate!r}: expected True or False")
    bad = [s for s in cfg.splits if s not in ("train", "val", "test")]
    if bad or not cfg.splits:
        raise UserError(f"model_card config splits={tuple(cfg.splits)!r}: expected splits among train, val, test")


def _fmt(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pm(r) -> str:
    return "–" if not r or r.get("mean") is None else f"{r['mean']:.4f} ± {r['std']:.4f}"


def metrics_table(res: dict[str, Any]) -> list[str]:
    """The eval result's point estimates per group, its rounds (mean ± std) and the val-tuned threshold."""
    from leader_jax.metrics import GROUPS

    head = "| group | n | " + " | ".join(c for _, c in COLS) + " |"
    rule = "|---|---:|" + "---:|" * len(COLS)
    lines = [f"Threshold p >= {res['threshold']:g}:", "", head, rule]
    lines += [f"| {g} | {res[g]['n']} | " + " | ".join(_fmt(res[g][k]) for k, _ in COLS) + " |" for g in GROUPS]
    rc = res.get("rounds_config") or {}
    if res.get("rounds"):
        lines.append(f"| rounds ({rc.get('rounds')} × {rc.get('fraction', 0):.0%}) | | "
                     + " | ".join(_pm(res["rounds"].get(k)) for k, _ in COLS) + " |")
    t = res.get("tuned")
    if t:
        lines += ["", f"Threshold tuned on {t['source']} (max mean Jaccard): p >= {t['threshold']:g}:", "", head, rule]
        lines += [f"| {g} | {t[g]['n']} | " + " | ".join(_fmt(t[g][k]) for k, _ in COLS) + " |" for g in GROUPS]
    return lines


def _eval_result(run: Path, split: str, evaluate: bool) -> tuple[dict | None, str]:
    path = run / "eval" / f"{split}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()), f"from `{path.name}` (eval CLI)"
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if evaluate and (run / "predictions" / f"{split}.npz").is_file():
        from leader_jax.cli import load_config
        from leader_jax.eval import evaluate_run

        ecfg = load_config("eval.py", {"run_dir": str(run), "split": split, "plots": False})
        return evaluate_run(ecfg), "computed in-process with the eval CLI's `evaluate_run`"
    return None, ""


def _config_lines(cfg: dict[str, Any], model: str) -> list[str]:
    keep = {"student": ("distill", "features", "seed", "model", "loss", "train"),
            "teacher": ("config_name", "seed", "model", "tokenizer", "lora", "data", "train")}.get(model, tuple(cfg))
    lines = []
    for k in keep:
        if k not in cfg:
            continue
        v = cfg[k]
        if isinstance(v, dict):
            flat = ", ".join(f"{a}={json.dumps(b)}" for a, b in v.items() if not isinstance(b, dict))
            lines.append(f"- `{k}`: {flat}")
        else:
            lines.append(f"- `{k}`: {json.dumps(v)}")
    return lines


def model_card(run_dir: str | Path, cfg: ConfigDict | None = None) -> str:
    """The markdown of RUN's model card."""
    from leader_jax.cli import load_config
    from leader_jax.eval import load_prepared, open_run

    cfg = load_config("model_card.py") if cfg is None else cfg
    validate_config(cfg)
    run, meta = open_run(run_dir, ("student", "teacher"), "a model card is written for student and teacher runs")
    model = meta["model"]
    rcfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    data = load_prepared(meta["data_dir"]) if meta.get("data_dir") else None
    L = [f"# Model card: LEADER {model} (`{run.name}`)", ""]
    L += ["## Model", "",
          {"student": "LEADER(S): a compact code-set encoder (diagnoses, procedures, earlier drugs, profile) "
                      "with a multi-label drug head" + (", distilled from an LLM teacher's features"
                                                        if rcfg.get("distill") else ", trained without distillation"),
           "teacher": "LEADER teacher: a LLaMA with LoRA adapters and a sigmoid drug head over a text prompt "
                      "of the patient's visits"}[model] + ".",
          f"- run folder: `{run}`"]
    for k in ("best_epoch", "epochs_run", "n_params", "n_params_inference", "best_step", "inference"):
        if k in meta:
            L.append(f"- {k.replace('_', ' ')}: {meta[k]}")
    L += ["", "## Data", ""]
    if data is None:
        L.append("- the run names no prepared data folder (run.json data_dir)")
    else:
        st = data.stats
        L += [f"- dataset: **{data.dataset}**, prepared folder `{meta['data_dir']}` (fingerprint "
              f"{data.fingerprint()[:16]}…)",
              f"- cohort: {st.get('n_patients', '?')} patients, {st.get('n_visits', '?')} visits "
              f"({st.get('n_patients_multi_visit', '?')} patients with several visits)",
              "- split (samples): " + ", ".join(f"{s} {len(data.splits[s])}" for s in ("train", "val", "test"))]
        times = sorted(v.time for s in data.all_samples() for v in s.visits if v.time)
        if times and data.dataset in ("mimic3", "mimic4", "synthetic"):
            L.append(f"- visit dates: {times[0][:10]} to {times[-1][:10]} (as stored; MIMIC dates are shifted "
                     "per patient for de-identification, so they are not calendar dates)")
        else:
            L.append("- date range: not known (the dataset stores no calendar dates)")
        conf = st.get("config") or {}
        proto = [f"{k}={conf[k]}" for k in ("protocol", "split", "visit_order") if k in conf]
        if proto:
            L.append("- protocol: " + ", ".join(proto))
        L += ["", "## Label space", ""]
        ns = {t.partition(":")[0] for t in data.vocab.med}
        L.append(f"- {data.vocab.n_med} drugs: " + "; ".join(LABEL_SPACES.get(n, n) for n in sorted(ns)))
        L.append(f"- inputs: {len(data.vocab.diag)} diagnosis and {len(data.vocab.proc)} procedure codes, "
                 f"profile fields {', '.join(data.vocab.profile) or 'none'}")
        ddi = st.get("ddi") or {}
        L.append(f"- DDI graph: {ddi.get('graph')} ({ddi.get('n_pairs')} interacting pairs)" if data.ddi is not None
                 else "- DDI graph: none (DDI rate not defined; no interaction warnings)")
    L += ["", "## Training config", ""] + (_config_lines(rcfg, model) or ["- config.json not found"])
    L += ["", "## Metrics", ""]
    for split in cfg.splits:
        res, source = _eval_result(run, split, cfg.evaluate)
        L += [f"### {split}", ""]
        if res is None:
            L.append(f"No evaluation yet: run `python -m leader_jax.eval --config.run_dir={run} "
                     f"--config.split={split}` and write the card again.")
        else:
            L += [f"{res['n']} samples, {source}.", ""] + metrics_table(res)
        L.append("")
    L += ["## Intended use and limits", "",
          "- Research use: reproducing and studying LLM-distilled medication recommendation. **Not a clinical "
          "device**: not validated for, and not to be used in, patient care.",
          "- Recommendations are drug classes seen in the training data's label space; a code outside the "
          "run's vocabulary is not used (`python -m leader_jax.predict` lists such codes per patient).",
          "- Numbers measured on the bundled demo datasets (about a hundred patients for MIMIC, ~1,300 for "
          "eICU) show that the pipeline works; they say nothing about clinical performance.",
          "- The DDI graph (MIMIC only) is a fixed list of interacting ATC-3 pairs; a missing pair is not "
          "evidence of safety.",
          ""]
    return "\n".join(L)


def write_model_card(run_dir: str | Path, cfg: ConfigDict | None = None) -> Path:
    """Write RUN/model_card.md (atomically); returns its path."""
    from leader_jax.io import atomic_write_text

    return atomic_write_text(Path(run_dir) / "model_card.md", model_card(run_dir, cfg))


def write_after_training(run_dir: str | Path) -> Path:
    """The end-of-run hook of the student and teacher stages: the card with in-process metrics; if those
    cannot be computed, a warning and a card without them (a finished training run never fails here)."""
    import warnings

    try:
        return write_model_card(run_dir)
    except UserError as e:
        warnings.warn(f"{run_dir}: model card written without metrics ({e})", stacklevel=2)
        from leader_jax.cli import load_config
        return write_model_card(run_dir, load_config("model_card.py", {"run_dir": str(run_dir),
                                                                        "evaluate": False}))


def main(cfg: ConfigDict, args: list[str]) -> None:
    if args:
        raise UserError(f"unexpected positional arguments: {args}")
    if not cfg.run_dir:
        raise UserError("set --config.run_dir=RUN (a student or teacher run folder)")
    print(f"model card → {write_model_card(cfg.run_dir, cfg)}")


if __name__ == "__main__":
    from leader_jax.cli import run
    run(main, "model_card.py", out_flag=False)
