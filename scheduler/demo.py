"""`realfake-scheduler demo`: the whole loop on the embedded default, in one folder."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml
from rich.console import Console

from realfake.models import imagenet_weights_cached
from realfake.synthetic import make_synthetic


def _demo_spec(data: Path, epochs: int, weights: str) -> dict:
    return {
        "name": "demo",
        "data": str(data),
        "split": {"val": 0.2, "test": 0.2, "seed": 0},
        "metric": {"name": "accuracy", "goal": "maximize"},
        "method": "grid",
        "parameters": {"lr": {"values": [1e-3, 3e-4, 1e-5]}},
        "base": {
            "backbone": "mobilenet_v2", "weights": weights, "resize": 72, "image_size": 64,
            "rotation": 5, "color_jitter": 0.1, "batch_size": 16, "epochs": epochs,
        },
        "early_terminate": {"type": "asha", "min_epochs": 1, "reduction_factor": 3},
    }


def run_demo(workdir: Path, data: Path | None, epochs: int, console: Console) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["REALFAKE_HOME"] = str(workdir / ".realfake")  # local workers inherit it
    from scheduler import cli  # after REALFAKE_HOME is set

    if data is None:
        data = workdir / "data"
        if not data.exists():
            console.print(f"1. generating synthetic faces in {data}")
            make_synthetic(data, per_class=100, size=64, seed=0)
    to_score = workdir / "to-score"
    if not to_score.exists():
        fresh = make_synthetic(workdir / ".fresh", per_class=20, size=64, seed=99)
        to_score.mkdir()
        for image in sorted(fresh.rglob("*.jpg")):
            shutil.move(image, to_score / image.name)
        shutil.rmtree(fresh)
    weights = "imagenet" if imagenet_weights_cached("mobilenet_v2") else "none"
    if weights == "none":
        console.print("MobileNetV2 ImageNet weights are not in the torch cache: random init", style="yellow")
    spec_path = workdir / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(_demo_spec(data, epochs, weights), sort_keys=False))

    console.print(f"2. sweep {spec_path} on a local worker (ASHA prunes runs that fall behind)")
    cli.sweep(spec_path, data=None, local=True, workers=1, dry_run=False, as_json=False)
    console.print(f"3. scoring {to_score} with the best run")
    predictions = workdir / "predictions.csv"
    try:
        cli.score(to_score, model="best", sweep=None, batch_size=64, shard_size=16, out=predictions,
                  local=True, workers=1, as_json=False)
    finally:
        console.print(f"   predictions: {predictions}")
    settings = cli._settings()
    with cli.session_scope(cli._database(settings)) as session:
        best = cli._best_runs(session, None, 1)[0]
    cli.report(best, out=workdir / "report.html")
    console.print(f"4. done. Try: REALFAKE_HOME={workdir / '.realfake'} {_scheduler_command()} runs")


def _scheduler_command() -> str:
    """`realfake-scheduler` where it is on PATH; otherwise its path in this environment (`make demo`'s .venv)."""
    if shutil.which("realfake-scheduler"):
        return "realfake-scheduler"
    return str(Path(sys.executable).parent / "realfake-scheduler")
