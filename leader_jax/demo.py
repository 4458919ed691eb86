"""`python -m leader_jax.demo`: the whole LEADER pipeline on a bundled demo dataset, end to end.

prepare data → stage 1 (a domain adapter on SmolLM2-135M: causal LM on the training prompts + ICD/ATC
titles) → stage 2 teacher (task LoRA + drug head on top of it) → teacher feature store → student with KD and
without → the four baselines → `leader_jax.eval` of everything → one comparison table (printed, and written
with plots to `<out>/report.md`), with each stage's wall time. `--config.teacher_model=tiny` replaces the
pretrained LLM by a tiny LLaMA trained from scratch with its own BPE tokenizer (fast; the demo test's path).

Every stage runs in this process through the same functions as its own CLI, with `configs/<stage>.py`
plus the overrides in `configs/demo.py`. A finished stage leaves `<stage dir>/.demo_stage.json` holding the
hash of its config; a re-run reuses it when the hash is unchanged (`--config.fresh=True` reruns all).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ml_collections import ConfigDict

from leader_jax import cli
from leader_jax.io import atomic_write_json, atomic_write_text, dumps_json, progress

MARKER = ".demo_stage.json"


class Stage:
    """One pipeline step: a name, its output folder, its effective config and the function that runs it."""

    def __init__(self, name: str, out: Path, cfg: Any, fn: Callable[[], None], after: tuple[str, ...] = ()):
        self.name, self.out, self.cfg, self.fn, self.after = name, out, cfg, fn, after

    def key(self, upstream: dict[str, str]) -> str:
        text = self.cfg.to_json_best_effort(sort_keys=True) if isinstance(self.cfg, ConfigDict) \
            else json.dumps(self.cfg, sort_keys=True, default=str)
        h = hashlib.sha256(text.encode())
        for dep in self.after:                      # a changed upstream stage invalidates this one
            h.update(upstream[dep].encode())
        return h.hexdigest()

    def done(self, key: str) -> bool:
        marker = self.out / MARKER
        return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def build_stages(cfg: ConfigDict) -> list[Stage]:
    """The demo's stages with their effective configs (nothing runs here)."""
    root = Path(cfg.out)
    data_dir, tok_dir, pre_dir = root / "data", root / "tokenizer", root / "pretrain"
    teacher_dir, store = root / "teacher", root / "teacher" / "features"
    data_cfg = _with(cfg.data, dataset=cfg.dataset, raw_dir=cfg.raw_dir, out=str(data_dir))
    tiny = cfg.teacher_model == "tiny"
    pre_cfg = _with(cfg.tiny.pretrain if tiny else cfg.pretrain, data_dir=str(data_dir), out=str(pre_dir))
    teacher_cfg = _with(cfg.tiny.teacher if tiny else cfg.teacher, data_dir=str(data_dir), out=str(teacher_dir))
    with pre_cfg.unlocked(), teacher_cfg.unlocked():
        if tiny:        # BPE tokenizer -> tiny LLaMA from scratch (stage 1) -> its PRE/base under stage 2
            pre_cfg.tokenizer.train, pre_cfg.tokenizer.path = False, str(tok_dir)
            teacher_cfg.model.path = str(pre_dir / "base")
        else:           # the pretrained base of stage 1 + its domain adapter under stage 2
            teacher_cfg.model.path = pre_cfg.model.path
            teacher_cfg.lora.domain_path = str(pre_dir / "domain_adapter")
    feat_cfg = _with(cfg.features, run_dir=str(teacher_dir), out=str(store))
    preset = student_preset(cfg)
    students = {name: _with(cfg.student, data_dir=str(data_dir), distill=distill,
                            features=str(store) if distill else "", out=str(root / name))
                for name, distill in (("student_kd", True), ("student_nokd", False))}
    for scfg in students.values():
        scfg.loss.update(preset)
    students["student_kd"].train.lr = float(cfg.student_kd_lr)
    base_cfgs = {name: _with(cfg.baseline, data_dir=str(data_dir), name=name) for name in cfg.baselines}

    from leader_jax import baselines
    from leader_jax.data import prepare
    from leader_jax.train import extract_features, pretrain, student, teacher

    stages = [Stage("data", data_dir, data_cfg, lambda: prepare.main(data_cfg, []))]
    if tiny:
        stages.append(Stage("tokenizer", tok_dir, {"vocab": cfg.tokenizer_vocab, "corpus": pre_cfg.corpus.to_dict(),
                                                   "seed": pre_cfg.seed},
                            lambda: make_tokenizer(pre_cfg, cfg.tokenizer_vocab, tok_dir), after=("data",)))
    stages += [
        Stage("pretrain", pre_dir, pre_cfg, lambda: pretrain.main(pre_cfg, []),
              after=("tokenizer",) if tiny else ("data",)),
        Stage("teacher", teacher_dir, teacher_cfg, lambda: teacher.main(teacher_cfg, []), after=("pretrain",)),
        Stage("features", store, feat_cfg, lambda: extract_features.main(feat_cfg, []), after=("teacher",)),
    ]
    for name, scfg in students.items():
        stages.append(Stage(name, root / name, scfg, lambda scfg=scfg: student.main(scfg, []),
                            after=("features",) if scfg.distill else ("data",)))
    for name, bcfg in base_cfgs.items():
        stages.append(Stage(f"baseline:{name}", root / "baselines" / name, bcfg,
                            lambda bcfg=bcfg, name=name: baselines.run_baseline(bcfg, root / "baselines" / name),
                            after=("data",)))
    return stages


def _with(base: ConfigDict, **fields: Any) -> ConfigDict:
    """A copy of a stage config with some top-level fields set."""
    out = ConfigDict(base.to_dict())
    with out.unlocked():
        for k, v in fields.items():
            out[k] = v
    return out


def student_preset(cfg: ConfigDict) -> dict[str, Any]:
    """The paper's per-dataset KD/alignment weights (configs/student.py PRESETS; `student.loss` fields),
    unless the user set them."""
    default = cli.load_config("student.py").loss
    preset = cli.load_config(f"student.py:{'eicu' if cfg.dataset == 'meds' else cfg.dataset}").loss
    return {k: preset[k] for k in ("alpha", "align_weight")
            if cfg.student.loss[k] == default[k] and preset[k] != default[k]}


def make_tokenizer(pre_cfg: ConfigDict, vocab_size: int, out: Path) -> None:
    """Train the byte-level BPE on stage 1's training documents (the held-out slice excluded)."""
    from leader_jax.data.dataset import PreparedData
    from leader_jax.tokenizer import train_bpe_tokenizer
    from leader_jax.train.pretrain import build_corpus, split_heldout

    docs, _ = build_corpus(pre_cfg, PreparedData.load(pre_cfg.data_dir))
    _, train_docs = split_heldout(docs, pre_cfg.corpus.heldout_fraction)
    train_bpe_tokenizer(train_docs, vocab_size, out)


def model_runs(cfg: ConfigDict) -> list[Path]:
    """Run folders of every model that writes predictions, in table order."""
    root = Path(cfg.out)
    return [root / "teacher", root / "student_kd", root / "student_nokd"] + \
        [root / "baselines" / b for b in cfg.baselines]


def evaluate_all(cfg: ConfigDict) -> str:
    """`leader_jax.eval` on every model run (threshold tuned on val), then the comparison table."""
    from leader_jax.eval import compare_runs, evaluate_run

    runs = model_runs(cfg)
    for run in progress(runs, desc="eval", unit="run"):
        evaluate_run(_with(cfg.eval, run_dir=str(run), split=cfg.split))
    return compare_runs([str(r) for r in runs], cfg.split)


def write_report(cfg: ConfigDict, table: str, timings: dict[str, float]) -> Path:
    """`<out>/report.md`: the table, per-stage wall time, links to every run's evaluation and plots."""
    root = Path(cfg.out)
    stats = json.loads((root / "data" / "stats.json").read_text())
    plot = comparison_plot(cfg, root / "comparison.png")
    lines = [f"# leader_jax demo on {cfg.dataset} ({cfg.split} split)", "",
             f"{stats['n_patients']} patients, {stats['n_visits']} visits, samples {stats['n_samples']}, "
             f"{stats['n_med']} drug labels. Metrics: mean ± std over 10 rounds of 80 % subsampling; "
             f"θ = 0.5 (`p >= θ`) for every model, plus the threshold tuned on val (never on test).", "",
             f"Teacher: {TEACHER_NAMES[cfg.teacher_model]}.", "",
             table, "", f"![comparison]({plot.name})", "", "## Stages (wall time, seconds)", "",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", "## Per-model reports", ""]
    for run in model_runs(cfg):
        rel = run.relative_to(root)
        lines.append(f"- `{rel}`: [{cfg.split}.md]({rel}/eval/{cfg.split}.md), "
                     f"[groups]({rel}/eval/{cfg.split}_groups.png), "
                     f"[calibration]({rel}/eval/{cfg.split}_calibration.png), "
                     f"[per-drug F1]({rel}/eval/{cfg.split}_drug_f1.png)")
    lines += ["", "Data: " + ("eICU Collaborative Research Database Demo v2.0.1" if cfg.dataset == "eicu" else
                              f"{cfg.dataset.upper()} Clinical Database Demo") +
              " (PhysioNet, ODbL 1.0); results are produced works of that database. Demo-sized data: the "
              "numbers show that the pipeline works, not clinical performance."]
    return atomic_write_text(root / "report.md", "\n".join(lines) + "\n")


def comparison_plot(cfg: ConfigDict, path: Path) -> Path:
    """Grouped bars (Jaccard, PRAUC, F1; mean ± std over rounds) for every model."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from leader_jax.io import atomic_write_bytes

    runs = model_runs(cfg)
    keys = ("jaccard", "prauc", "f1")
    res = [json.loads((r / "eval" / f"{cfg.split}.json").read_text())["rounds"] for r in runs]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    w = 0.8 / len(runs)
    for j, (run, rr) in enumerate(zip(runs, res)):
        ax.bar(np.arange(len(keys)) + (j - (len(runs) - 1) / 2) * w, [rr[k]["mean"] or 0 for k in keys], w,
               yerr=[rr[k]["std"] or 0 for k in keys], label=run.name)
    ax.set_xticks(np.arange(len(keys)), ["Jaccard (θ=0.5)", "PRAUC", "F1 (θ=0.5)"])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"leader_jax demo, {cfg.dataset}, {cfg.split} split")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def run_demo(cfg: ConfigDict) -> str:
    """Run (or reuse) every stage, evaluate, write the report; returns the comparison table."""
    root = Path(cfg.out)
    if cfg.fresh and root.exists():
        shutil.rmtree(root)
    stages = build_stages(cfg)
    keys: dict[str, str] = {}
    timings: dict[str, float] = {}
    bar = progress(stages, desc="demo", unit="stage", disable=False)
    for stage in bar:
        bar.set_postfix(stage=stage.name)
        key = keys[stage.name] = stage.key(keys)
        if stage.done(key):
            print(f"[demo] {stage.name}: reusing {stage.out}", file=sys.stderr)
            continue
        if (stage.out / MARKER).is_file():        # finished under other settings: start it afresh
            shutil.rmtree(stage.out)              # (an interrupted stage has no marker and resumes)
        t0 = time.perf_counter()
        print(f"[demo] {stage.name} → {stage.out}", file=sys.stderr)
        stage.fn()
        timings[stage.name] = time.perf_counter() - t0
        print(f"[demo] {stage.name}: {timings[stage.name]:.1f} s", file=sys.stderr)
        atomic_write_json(stage.out / MARKER, {"stage": stage.name, "key": key, "seconds": timings[stage.name]})
    t0 = time.perf_counter()
    table = evaluate_all(cfg)
    timings["eval"] = time.perf_counter() - t0
    all_times = {s.name: json.loads((s.out / MARKER).read_text())["seconds"] for s in stages}
    all_times["eval"] = timings["eval"]
    report = write_report(cfg, table, all_times)
    print(table)
    print(f"\n[demo] report: {report}  (stage seconds: {dumps_json(all_times).strip()})", file=sys.stderr)
    return table


DATASETS = ("eicu", "mimic3", "mimic4", "meds")   # meds: the eICU demo through export_meds + the MEDS reader
TEACHER_NAMES = {"smollm2": "SmolLM2-135M-Instruct (GGUF) + stage-1 domain adapter + task LoRA + drug head",
                 "tiny": "a tiny LLaMA trained from scratch on the demo's text (stage 1) + task LoRA + drug head"}
TEACHER_MODELS = tuple(TEACHER_NAMES)


def validate_config(cfg: ConfigDict) -> None:
    """The demo's own fields, then every stage's effective config through that stage's validate_config,
    so a bad stage setting fails before the first stage runs."""
    if cfg.dataset not in DATASETS:
        raise cli.UserError(f"demo dataset={cfg.dataset!r}: expected {' | '.join(DATASETS)}")
    if cfg.teacher_model not in TEACHER_MODELS:
        raise cli.UserError(f"demo teacher_model={cfg.teacher_model!r}: expected {' | '.join(TEACHER_MODELS)}")
    if not float(cfg.student_kd_lr) > 0:
        raise cli.UserError(f"demo student_kd_lr={cfg.student_kd_lr}: expected a positive learning rate")
    if int(cfg.tokenizer_vocab) <= 4:
        raise cli.UserError(f"demo tokenizer_vocab={cfg.tokenizer_vocab} is too small")
    from leader_jax import baselines, eval as evaluation
    from leader_jax.data import prepare
    from leader_jax.train import extract_features, pretrain, student, teacher

    checks = {"data": prepare, "pretrain": pretrain, "teacher": teacher, "features": extract_features,
              "student": student, "baseline": baselines, "eval": evaluation, "tiny.pretrain": pretrain,
              "tiny.teacher": teacher}
    for block, module in checks.items():
        try:
            module.validate_config(cfg.tiny[block.split(".")[1]] if block.startswith("tiny.") else cfg[block])
        except cli.UserError as e:
            raise cli.UserError(f"demo {block}: {e}") from None


def main(cfg: ConfigDict, args: list[str]) -> None:
    if args:
        raise cli.UserError(f"unexpected arguments {args}")
    validate_config(cfg)
    run_demo(cfg)


if __name__ == "__main__":
    cli.run(main, "demo.py")
