"""Shared set-up of the training stages: distributed init, mesh, base model + tokenizer loading, logs.

A base model comes from one of: `hf` (a pretrained LLaMA at `model.path`: an HF folder such as stage 1's
`PRE/base`, a llama.cpp `.gguf` file, or a bundled name such as `smollm2`), or `scratch` (random init of a
`LlamaConfig` preset; stage 1 of the tiny demo). Tokenizers are loaded with `transformers.AutoTokenizer`
(never `trust_remote_code`), from a `tokenizer.json` file, or rebuilt from a GGUF file's metadata and saved
beside the run as an ordinary tokenizer folder (`RUN/tokenizer`) that later stages read.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from leader_jax import sharding as shd
from leader_jax.cli import UserError
from leader_jax.io import JsonlLogger, atomic_write_json
from leader_jax.train import distributed

log = logging.getLogger(__name__)


def setup_distributed(cfg: ConfigDict) -> None:
    """Multi-process init from config/env (before any JAX computation)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)          # orbax logs every file it writes at INFO
    d = cfg.distributed                     # coordinator "" / num_processes 0 = from the environment
    distributed.maybe_initialize(coordinator=d.coordinator or None,
                                 num_processes=int(d.num_processes) or None,
                                 process_id=int(d.process_id) if int(d.num_processes) else None,
                                 auto=bool(d.auto))


def make_mesh(cfg: ConfigDict):
    shape = tuple(int(s) for s in cfg.mesh)
    devices = None
    if -1 not in shape and math.prod(shape) < jax.device_count() and jax.process_count() == 1:
        devices = jax.devices()[:math.prod(shape)]        # e.g. mesh (1,1,1) on an 8-device host
    try:
        return shd.make_mesh(shape, devices=devices)
    except ValueError as e:
        raise UserError(f"config mesh={shape}: {e}") from None


def check_batch_sizes(mesh, sizes: dict[str, int]) -> None:
    """UserError naming the config field whose batch size is not a multiple of the mesh's batch
    parallelism (the "batch" entry of LOGICAL_AXIS_RULES)."""
    try:
        for name, value in sizes.items():
            shd.check_batch_size(name, value, mesh)
    except ValueError as e:
        raise UserError(str(e)) from None


DOT_DTYPES = ("", "float32", "bfloat16", "float16")


def check_dot_dtype(mcfg: ConfigDict) -> None:
    """UserError unless `model.dot_dtype` is "" (the compute dtype) or a known float dtype."""
    if mcfg.dot_dtype not in DOT_DTYPES:
        raise UserError(f"model.dot_dtype={mcfg.dot_dtype!r}; expected \"\" (= model.dtype) | "
                        f"{' | '.join(DOT_DTYPES[1:])}")


def llama_overrides(mcfg: ConfigDict) -> dict[str, Any]:
    """LlamaConfig fields the run config overrides: `model.remat`, `model.attention_impl` ("" = XLA),
    `model.dot_dtype` ("" = the compute dtype; run configs saved before the field existed lack it)."""
    out = {"remat": mcfg.remat}
    if mcfg.attention_impl:
        out["attention_impl"] = mcfg.attention_impl
    if "dot_dtype" in mcfg and mcfg.dot_dtype:
        out["dot_dtype"] = mcfg.dot_dtype
    return out


def load_tokenizer(path: str | Path):
    """An HF tokenizer from a folder (AutoTokenizer, no remote code), a `tokenizer.json` file, or a GGUF file
    / model name (rebuilt by transformers from the file's metadata; see `load_run_tokenizer`)."""
    from leader_jax.checkpoints import gguf

    if gguf.is_gguf_spec(path):
        return gguf.gguf_tokenizer(path)
    path = Path(path)
    if path.is_file():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path))
    if not path.exists():
        raise UserError(f"tokenizer not found: {path}")
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.model").exists():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    raise UserError(f"{path}: no tokenizer.json / tokenizer_config.json")


RUN_TOKENIZER = "tokenizer"          # RUN/tokenizer: a GGUF model's tokenizer as an HF tokenizer folder
_TOKENIZER_SOURCE = "leader_jax_tokenizer_source.json"


def load_run_tokenizer(spec: str | Path, run: str | Path):
    """The tokenizer of `spec` for the run folder `run`. For a GGUF file or name it is rebuilt from the file
    once and saved as `RUN/tokenizer` (an ordinary HF tokenizer folder; process 0 writes it), and read from
    there afterwards (also by feature extraction); any other spec is `load_tokenizer(spec)`."""
    from leader_jax.checkpoints import gguf

    if not gguf.is_gguf_spec(spec):
        return load_tokenizer(spec)
    folder = Path(run) / RUN_TOKENIZER
    source = str(gguf.resolve_model_path(spec).absolute())
    marker = folder / _TOKENIZER_SOURCE
    if marker.is_file() and json.loads(marker.read_text()).get("model") == source:
        return load_tokenizer(folder)
    if not distributed.is_main_process():
        return gguf.gguf_tokenizer(spec)
    tok = gguf.gguf_tokenizer(spec, out_dir=folder)
    atomic_write_json(marker, {"model": source})
    return tok


def load_base(mcfg: ConfigDict, mesh, seed: int):
    """(LlamaConfig, Llama on `mesh`) from `model.source` = hf (`model.path`: an HF folder, a `.gguf` file
    or a bundled name such as `smollm2`) | scratch."""
    from leader_jax.checkpoints import gguf
    from leader_jax.models import llama

    if mcfg.source == "hf":
        if not mcfg.path:
            raise UserError("model.source=hf needs model.path (an HF LLaMA folder, a .gguf file or 'smollm2')")
        if gguf.is_gguf_spec(mcfg.path):
            return gguf.load_gguf(mcfg.path, dtype=mcfg.param_dtype, mesh=mesh,
                                  compute_dtype=mcfg.dtype or None, **llama_overrides(mcfg))
        if not (Path(mcfg.path) / "config.json").exists():
            raise UserError(f"model.path={mcfg.path}: no config.json (not an HF LLaMA folder, a .gguf file or "
                            f"one of {sorted(gguf.NAMED_MODELS)})")
        return llama.load_hf(mcfg.path, dtype=mcfg.param_dtype, mesh=mesh,
                             compute_dtype=mcfg.dtype or None, **llama_overrides(mcfg))
    if mcfg.source == "scratch":
        arch = dict(mcfg.arch)
        conf = llama.LlamaConfig(**arch, param_dtype=mcfg.param_dtype,
                                 dtype=mcfg.dtype or mcfg.param_dtype, **llama_overrides(mcfg))
        from leader_jax.train.engine import place
        return conf, place(llama.init_model(conf, seed=seed), mesh)
    raise UserError(f"model.source={mcfg.source!r}; expected 'hf' or 'scratch'")


def start_run(cfg: ConfigDict):
    """Shared start of a training stage: distributed init, the run folder with its config.json, and the
    prepared data -> (run folder, PreparedData). A bad data folder is a one-line UserError."""
    from leader_jax.data.dataset import PreparedData

    setup_distributed(cfg)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", json.loads(cfg.to_json_best_effort()))
    try:
        return run, PreparedData.load(cfg.data_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"cannot load prepared data {cfg.data_dir}: {e}") from None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (the process was killed while writing it) is
    dropped with a warning, a bad line elsewhere is a UserError naming it."""
    lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
    recs = []
    for i, line in enumerate(lines):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%s)", path, e)
                break
            raise UserError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return recs


def open_log(run: Path, resume_step: int) -> JsonlLogger:
    """metrics.jsonl logger for process 0; on resume, records after the restored step are dropped
    (they belong to steps that will be replayed), and so is a torn last line."""
    path = run / "metrics.jsonl"
    main = distributed.is_main_process()
    if main and path.exists():
        keep = [r for r in read_log(path) if int(r["step"]) <= resume_step]
        from leader_jax.io import atomic_write_text
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
    return JsonlLogger(path, enabled=main)


def write_json(path: Path, obj: Any) -> None:
    if distributed.is_main_process():
        atomic_write_json(path, obj)


def mesh_info(mesh) -> dict[str, Any]:
    return {"mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
            "platform": jax.devices()[0].platform}


# Fields that may change between a run and its resume without changing what is trained: where it runs
# and is written (the mesh: a checkpoint restores onto any mesh), when it stops or checkpoints.
RESUME_FREE_FIELDS = ("out", "resume", "stop_after", "verbosity", "mesh", "distributed", "ckpt_every")


def config_hash(cfg: ConfigDict, ignore: tuple[str, ...] = RESUME_FREE_FIELDS) -> str:
    """sha256 of the config with every field whose last name is in `ignore` removed (at any depth):
    the part of a run's identity that a resume must not change."""
    import hashlib

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in sorted(d.items()) if k not in ignore}
        return d

    blob = json.dumps(strip(json.loads(cfg.to_json_best_effort())), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_identity(cfg: ConfigDict, data_fingerprint: str) -> dict[str, str]:
    """What a checkpoint records about the run that wrote it: the prepared data and the config."""
    return {"data_fingerprint": str(data_fingerprint), "config_hash": config_hash(cfg)}


def check_identity(stored: dict, current: dict[str, str], run: Path, fresh_hint: str) -> None:
    """Refuse to resume a run whose prepared data or config changed (UserError naming what changed and
    how to start afresh). Checkpoints written before identities were stored (no keys) are accepted."""
    changed = [k for k in ("data_fingerprint", "config_hash") if k in stored and stored[k] != current[k]]
    if changed:
        what = {"data_fingerprint": "the prepared data (another folder, split or seed)",
                "config_hash": "the config"}
        raise UserError(f"{run}: cannot resume, {' and '.join(what[k] for k in changed)} changed since its "
                        f"checkpoints were written ({', '.join(f'{k} {stored[k][:12]}… != {current[k][:12]}…' for k in changed)}); "
                        f"start afresh with {fresh_hint} or a new --out folder")
