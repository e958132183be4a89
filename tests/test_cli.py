"""The scheduler CLI as a user runs it: a real subprocess on the embedded default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "scheduler.cli"]


def run_cli(*args, env, cwd):
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_demo_trains_a_run_and_show_lists_it(tmp_path, mobilenet_weights):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(mobilenet_weights, cache / mobilenet_weights.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")}
    env |= {"TORCH_HOME": str(tmp_path / "torch"), "PYTHONPATH": str(Path(__file__).parents[1])}

    demo = run_cli("demo", "--dir", str(tmp_path / "demo"), "--epochs", "2", env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "run 1 succeeded" in demo.stdout

    env["REALFAKE_HOME"] = str(tmp_path / "demo" / ".realfake")
    listing = json.loads(run_cli("runs", "--json", env=env, cwd=tmp_path).stdout)
    assert [(r["id"], r["status"], r["epochs_done"]) for r in listing] == [(1, "succeeded", 2)]
    detail = json.loads(run_cli("show", "1", "--json", env=env, cwd=tmp_path).stdout)
    assert len(detail["epochs_table"]) == 2 * 3
    assert detail["config"]["weights"] == "imagenet"

    missing = run_cli("show", "99", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "run 99 does not exist" in missing.stdout
    bad = run_cli("show", "abc", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "Invalid value" in bad.stderr
