"""Every bundled config file (and every preset it defines) passes its stage's `validate_config` as shipped,
and each validator rejects a bad value with a one-line UserError naming the field. A new config file that
no stage claims fails here, so no config can drift out of validation."""
import importlib
import importlib.util

import pytest

from leader_jax.cli import CONFIG_DIR, UserError, load_config

# config file -> the stage module whose validate_config checks it
STAGE_OF = {
    "data.py": "leader_jax.data.prepare",
    "baselines.py": "leader_jax.baselines",
    "eval.py": "leader_jax.eval",
    "pretrain_tiny.py": "leader_jax.train.pretrain",
    "pretrain_llama7b.py": "leader_jax.train.pretrain",
    "pretrain_smollm2.py": "leader_jax.train.pretrain",
    "teacher_smollm2.py": "leader_jax.train.teacher",
    "teacher_tiny.py": "leader_jax.train.teacher",
    "teacher_llama7b.py": "leader_jax.train.teacher",
    "teacher_llama3_8b.py": "leader_jax.train.teacher",
    "extract_features.py": "leader_jax.train.extract_features",
    "student.py": "leader_jax.train.student",
    "demo.py": "leader_jax.demo",
    "predict.py": "leader_jax.predict",
    "model_card.py": "leader_jax.model_card",
    "retrieval.py": "leader_jax.retrieval",
}


def _names_with_presets():
    out = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        out.append(path.name)
        spec = importlib.util.spec_from_file_location(f"cfgmod_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out += [f"{path.name}:{p}" for p in sorted(getattr(mod, "PRESETS", {}))]
    return out


ALL = _names_with_presets()


def test_every_config_file_has_a_stage():
    files = {n.partition(":")[0] for n in ALL}
    assert files == set(STAGE_OF), f"configs without a validating stage: {sorted(files - set(STAGE_OF))}"
    assert "student.py:mimic4" in ALL


def test_every_cli_default_config_exists_and_belongs_to_its_stage():
    """`cli.run(main, "X.py")` in a stage module names its default config: it must be a bundled file that the
    same stage validates (a renamed config once left `extract_features` without a default)."""
    import re
    from pathlib import Path

    import leader_jax

    root = Path(leader_jax.__file__).parent
    found = {}
    for path in root.rglob("*.py"):
        for name in re.findall(r"\brun\(main, \"([^\"]+)\"", path.read_text()):
            module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
            found[module] = name
    assert len(found) >= 10, found
    for module, name in sorted(found.items()):
        assert (CONFIG_DIR / name).is_file(), f"{module}: default config {name} not in configs/"
        assert STAGE_OF[name] == module, f"{module}: default {name} is validated by {STAGE_OF[name]}"


@pytest.mark.parametrize("name", ALL)
def test_bundled_config_validates(name):
    cfg = load_config(name)
    importlib.import_module(STAGE_OF[name.partition(":")[0]]).validate_config(cfg)


# one bad value per stage: (config, override, text the one-line error must contain)
BAD = [
    ("data.py", {"dataset": "mimic5"}, "mimic5"),
    ("baselines.py", {"name": "oracle"}, "oracle"),
    ("eval.py", {"threshold": 1.5}, "threshold"),
    ("pretrain_tiny.py", {"mode": "lora"}, "mode='lora'"),
    ("teacher_tiny.py", {"model.pool": "max"}, "model.pool='max'"),
    ("teacher_smollm2.py", {"model.dot_dtype": "bf16x"}, "model.dot_dtype='bf16x'"),
    ("pretrain_smollm2.py", {"model.dot_dtype": "int8"}, "model.dot_dtype='int8'"),
    ("teacher_tiny.py", {"train.optim.warmup_steps": 10_000}, "warmup_steps"),
    ("teacher_smollm2.py", {"lora.task.first_layer": 0}, "first_layer"),
    ("teacher_tiny.py", {"data.length_buckets": (64, -8)}, "data.length_buckets"),
    ("pretrain_smollm2.py", {"domain.first_layer": 0}, "first_layer"),
    ("demo.py", {"teacher_model": "llama"}, "teacher_model='llama'"),
    ("extract_features.py", {"checkpoint": "newest"}, "checkpoint='newest'"),
    ("student.py", {"loss.align_loss": "kl"}, "loss.align_loss='kl'"),
    ("demo.py", {"student.train.lr": -1.0}, "demo student"),
    ("demo.py", {"dataset": "meds_typo"}, "meds_typo"),
    ("demo.py", {"student_kd_lr": 0.0}, "student_kd_lr=0.0"),
    ("predict.py", {"ddi_filter": "strict"}, "ddi_filter='strict'"),
    ("model_card.py", {"splits": ("holdout",)}, "splits="),
]


@pytest.mark.parametrize("name,override,text", BAD, ids=[f"{n}:{next(iter(o))}" for n, o, _ in BAD])
def test_validator_rejects_bad_value(name, override, text):
    cfg = load_config(name)
    with cfg.unlocked():
        for dotted, value in override.items():
            *parents, leaf = dotted.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[leaf] = value
    module = importlib.import_module(STAGE_OF[name])
    with pytest.raises(UserError, match=None) as err:
        module.validate_config(cfg)
    assert text in str(err.value) and "\n" not in str(err.value)
