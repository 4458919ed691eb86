"""The benchmark suite: runs every benchmark script in its own process and writes `bench.json` plus a
markdown table (`bench.md`). Every speed figure is a ratio measured side by side in one process (medians)
or a throughput on the machine at hand; CPU figures from shared machines are indicative only.

    python scripts/bench.py [--quick] [--out bench.json]

| entry | script | what |
|---|---|---|
| llama | bench_llama.py | jitted LLaMA forward and forward+backward vs transformers/torch eager (ratio) |
| lora | bench_lora.py | SmolLM2-135M LoRA train step and feature extraction vs transformers+peft at 1 and 2 threads (ratios); teacher vs student inference per patient (ratio) |
| student | bench_student.py | student inference throughput (batch 512) and one training epoch |
| prepare | bench_prepare.py | data preparation throughput on synthetic MIMIC-III-format tables |
| eval | bench_eval.py | evaluation throughput (100,000 × 300, 10 rounds) |

When a GPU is visible to JAX it also runs `bench_mfu.py` (teacher LoRA-training MFU of a 7B-shaped layer
stack in bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(name: str, args: list[str], tmp: Path) -> dict:
    """Run one benchmark script with `--json`, echo its output, return its JSON (or the failure)."""
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(HERE / args[0]), *args[1:], "--json", str(out)]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LEADER_JAX_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    print(proc.stdout[-4000:], end="")
    if proc.returncode != 0 or not out.exists():
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    res = json.loads(out.read_text())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def table(res: dict) -> str:
    """The markdown summary of `bench.json`."""
    rows = ["| benchmark | measured | ratio / throughput |", "|---|---|---:|"]
    for r in res.get("llama", {}).get("results", []):
        rows.append(f"| LLaMA {r['size']} ({r['params_M']}M) forward | JAX {r['jax_fwd_s']} s vs torch "
                    f"{r['torch_fwd_s']} s | {r['ratio_fwd']}× |")
        rows.append(f"| LLaMA {r['size']} ({r['params_M']}M) forward+backward | JAX {r['jax_fwdbwd_s']} s vs "
                    f"torch {r['torch_fwdbwd_s']} s | {r['ratio_fwdbwd']}× |")
    lo = res.get("lora", {})
    for r in lo.get("runs", []):
        if "error" in r:
            continue
        tr, fe = r["train_step"], r["features"]
        rows.append(f"| LoRA train step, SmolLM2 {r['base_params_M']}M, batch {r['batch']}×{r['seq']}, "
                    f"{r['threads']} thread(s) | leader_jax {tr['jax']['median_s']} s vs torch+peft "
                    f"{tr['torch_peft']['median_s']} s | {tr['ratio']}× |")
        rows.append(f"| feature extraction, same teacher, {r['threads']} thread(s) | leader_jax "
                    f"{fe['jax']['median_s']} s vs torch+peft {fe['torch']['median_s']} s (merged: "
                    f"{fe['torch_merged']['median_s']} s) | {fe['ratio']}× ({fe['ratio_vs_merged']}× vs merged) |")
    for r in lo.get("teacher_vs_student", []):
        rows.append(f"| inference per patient: teacher {r['teacher_params_M']}M ({r['teacher_seq']} tokens) vs "
                    f"student | {r['teacher_ms_per_patient']} ms vs {r['student_ms_per_patient']} ms | "
                    f"{r['ratio']}× |")
    st = res.get("student", {})
    if "inference_patients_per_s" in st:
        rows.append(f"| student inference, batch 512 | {st['patients']:,} patients in {st['predict_median_s']} s | "
                    f"{st['inference_patients_per_s']:,} patients/s |")
        rows.append(f"| student training epoch, batch {st['train_batch_size']} | {st['patients']:,} patients in "
                    f"{st['train_epoch_median_s']} s | {st['train_patients_per_s']:,} patients/s |")
    pr = res.get("prepare", {})
    if "prepare_and_save_s" in pr:
        rows.append(f"| data preparation (synthetic MIMIC-III format) | {pr['n_patients']:,} patients in "
                    f"{pr['prepare_and_save_s']} s | {pr['patients_per_s']:,} patients/s |")
    ev = res.get("eval", {})
    if "summarize_median_s" in ev:
        rows.append(f"| evaluation, {ev['n']:,} × {ev['m']}, {ev['rounds']} rounds | {ev['summarize_median_s']} s | "
                    f"{ev['samples_per_s']:,} samples/s |")
    mfu = res.get("mfu", {})
    if "mfu" in mfu:
        rows.append(f"| teacher LoRA training MFU, 7B-shaped layers, bf16 ({mfu['device']}) | "
                    f"{mfu['tokens_per_s']:,.0f} tokens/s | MFU {100 * mfu['mfu']:.1f} % |")
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    if failed:
        rows.append(f"\nFailed: {', '.join(failed)} (see bench.json)")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run of the whole suite)")
    ap.add_argument("--out", default=str(ROOT / "bench.json"))
    a = ap.parse_args(argv)
    q = a.quick
    suite = {
        "llama": ["bench_llama.py", "--sizes", "xs" if q else "xs,s,m", "--reps", "2" if q else "5"],
        "lora": ["bench_lora.py", "--reps", "2" if q else "5", "--student_patients", "1024" if q else "8192",
                 *(["--threads", "1", "--batch", "2", "--seq", "32"] if q else ["--threads", "1,2"])],
        "student": ["bench_student.py", "--patients", "2000" if q else "46000", "--repeats", "2" if q else "5"],
        "prepare": ["bench_prepare.py", "--patients", "2000" if q else "46000"],
        "eval": ["bench_eval.py", "--n", "10000" if q else "100000", "--repeats", "2" if q else "5"],
    }
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        suite["mfu"] = ["bench_mfu.py"] + (["--layers", "2", "--steps", "3"] if q else [])
    res: dict = {"env": {"python": sys.version.split()[0], "jax": jax.__version__, "cpu_count": os.cpu_count(),
                         "devices": [str(d) for d in jax.devices()], "quick": q}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in suite.items():
            res[name] = run(name, args, Path(tmp))
    md = table(res)
    from leader_jax.io import atomic_write_json, atomic_write_text
    atomic_write_json(a.out, res)
    atomic_write_text(Path(a.out).with_suffix(".md"), md + "\n")
    print("\n" + md)
    return 1 if any(isinstance(v, dict) and "error" in v for v in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
