"""Shared CLI plumbing (leader_jax.cli): command-line mistakes end as one line `error: ...` with exit
status 2, an unknown config field names the nearest valid one (also nested ones, and in load_config)."""
import subprocess
import sys

import pytest

from leader_jax.cli import REPO_ROOT, UserError, load_config, unknown_field

ENV = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "LEADER_JAX_NO_PROGRESS": "1"}
# cli.run with a trivial main on a real config file: the flag handling every stage CLI shares
RUN = ("import sys; from leader_jax.cli import run; "
       "run(lambda cfg, args: print('ok', cfg.train.steps), 'teacher_tiny.py', argv=['x'] + sys.argv[1:])")


def cli(*args, module=None):
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, "-c", RUN, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
    return r.returncode, r.stderr.strip().splitlines(), r.stdout


def test_prepare_cli_config_typo_is_one_line(tmp_path):
    rc, err, _ = cli("--config.datset=mimic3", "--out", str(tmp_path / "o"), module="leader_jax.data.prepare")
    assert (rc, err) == (2, ["error: unknown config field 'datset' (did you mean 'dataset'?)"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,line", [
    (["--config.train.stpes=3"], "error: unknown config field 'train.stpes' (did you mean 'train.steps'?)"),
    ([f"--config={REPO_ROOT / 'configs/teacher_tiny.py'}", "--config.trian.steps=3"],
     "error: unknown config field 'trian.steps' (did you mean 'train.steps'?)"),
    (["--config.train.steps=many"], "error: flag --config.train.steps=many: invalid literal for int() with base 10: 'many'"),
    (["--config=nowhere/x.py"], "error: config file not found: nowhere/x.py"),
])
def test_run_flag_errors_are_one_line(args, line):
    rc, err, out = cli(*args)
    assert (rc, err, out) == (2, [line], "")


def test_run_good_override_reaches_main():
    rc, err, out = cli("--config.train.steps=3")
    assert (rc, out.strip()) == (0, "ok 3"), err


def test_out_of_memory_is_one_line_naming_the_knobs():
    run = ("import sys; from leader_jax.cli import run\n"
           "def main(cfg, args):\n"
           "    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 28712282496 bytes.')\n"
           "run(main, 'teacher_tiny.py', argv=['x'])")
    r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("error: out of memory (28.7 GB in one allocation): lower train.micro_batch")
    other = run.replace("RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 28712282496 bytes.')",
                        "KeyError('a bug')")
    r = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'a bug'" in r.stderr   # bugs stay visible


def test_unknown_field_and_load_config_suggest_nearest():
    cfg = load_config("teacher_tiny.py")
    assert unknown_field(cfg, "train.steps") is None and unknown_field(cfg, "train") is None
    assert unknown_field(cfg, "train.stpes") == "unknown config field 'train.stpes' (did you mean 'train.steps'?)"
    assert unknown_field(cfg, "zzzzzz") == "unknown config field 'zzzzzz'"
    with pytest.raises(UserError, match=r"^teacher_tiny\.py: unknown config field 'train\.stpes' "
                                        r"\(did you mean 'train\.steps'\?\)$"):
        load_config("teacher_tiny.py", {"train": {"stpes": 1}})
    with pytest.raises(UserError, match=r"unknown config field 'datset' \(did you mean 'dataset'\?\)"):
        load_config("data.py", {"datset": "eicu"})
