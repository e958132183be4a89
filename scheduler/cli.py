"""realfake-scheduler: each command is a few lines over one realfake call.

Errors a user can cause are turned into a message and exit status 2 in `main`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from realfake.config import Settings, SplitConfig, TrainConfig
from realfake.data import DatasetError
from realfake.metrics import Metrics
from realfake.models import WeightsUnavailable, imagenet_weights_cached
from realfake.report import list_runs, run_detail
from realfake.runs import RunNotFound, SqlHooks, create_run, train_run
from realfake.store import make_engine, migrate, session_factory, session_scope
from realfake.synthetic import make_synthetic
from realfake.train import BestSoFar

app = typer.Typer(help="Train and serve real-vs-fake face classifiers.", no_args_is_help=True)
console = Console()
USER_ERRORS = (DatasetError, WeightsUnavailable, RunNotFound, ValidationError, FileNotFoundError)


def _database(settings: Settings):
    engine = make_engine(settings.database_url)
    migrate(engine)
    return session_factory(engine)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


class ProgressHooks(SqlHooks):
    """SQL hooks that also drive a progress bar and print each epoch's line."""

    def __init__(self, factory, run_id: int, progress: Progress, epochs: int):
        super().__init__(factory, run_id)
        self.progress = progress
        self.task = progress.add_task(f"run {run_id}", total=None)
        self.epochs = epochs

    def on_batch(self, split: str, epoch: int, done: int, total: int) -> None:
        self.progress.update(
            self.task, completed=done, total=total, description=f"run {self.run_id} epoch {epoch}/{self.epochs} {split}"
        )

    def on_epoch_end(self, epoch: int, metrics: dict[str, Metrics], best: BestSoFar) -> bool:
        keep_going = super().on_epoch_end(epoch, metrics, best)
        parts = [f"{name} acc {m.accuracy:.3f} loss {m.loss or float('nan'):.3f}" for name, m in metrics.items()]
        self.progress.console.print(f"epoch {epoch}: " + " | ".join(parts))
        return keep_going


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


@app.command()
def runs(
    sweep: Annotated[Optional[int], typer.Option(help="only the runs of this sweep")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List runs."""
    with session_scope(_database(Settings.from_env())) as session:
        rows = list_runs(session, sweep)
    if as_json:
        return _print_json(rows)
    table = Table("run", "sweep", "status", "backbone", "epochs", "best epoch", "best val")
    for r in rows:
        table.add_row(
            str(r["id"]), _fmt(r["sweep_id"]), r["status"], r["backbone"],
            f"{r['epochs_done']}/{r['epochs']}", _fmt(r["best_epoch"]), _fmt(r["best_metric"]),
        )
    console.print(table)


@app.command()
def show(
    run: Annotated[int, typer.Argument(help="run id")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A run's config and per-epoch metrics for train, val and test."""
    with session_scope(_database(Settings.from_env())) as session:
        detail = run_detail(session, run)
    if as_json:
        return _print_json(detail)
    console.print(f"run {detail['id']}: {detail['status']}, {detail['epochs_done']}/{detail['epochs']} epochs, "
                  f"best epoch {_fmt(detail['best_epoch'])} ({detail['selection_metric']} {_fmt(detail['best_metric'])})")
    if detail["error"]:
        console.print(f"[red]error:[/red] {detail['error']}")
    table = Table("epoch", "split", "loss", "acc", "prec", "recall", "f1", "auc", "groups")
    for row in detail["epochs_table"]:
        groups = " ".join(f"{g} {a:.2f}" for g, a in row["group_accuracy"].items())
        table.add_row(
            str(row["epoch"]), row["split"],
            *(_fmt(row[k]) for k in ("loss", "accuracy", "precision", "recall", "f1", "roc_auc")), groups,
        )
    console.print(table)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--dir", help="folder for the demo's data and database")] = Path(
        "realfake-demo"
    ),
    data: Annotated[Optional[Path], typer.Option(help="a real dataset instead of synthetic images")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 4,
) -> None:
    """Generate synthetic faces, train a run on the embedded default, and show its metrics."""
    workdir = workdir.absolute()
    settings = Settings.from_env({**os.environ, "REALFAKE_HOME": str(workdir / ".realfake")})
    if data is None:
        data = workdir / "data"
        if not data.exists():
            console.print(f"generating synthetic faces in {data}")
            make_synthetic(data, per_class=100, size=64, seed=0)
    weights = "imagenet" if imagenet_weights_cached("mobilenet_v2") else "none"
    if weights == "none":
        console.print("[yellow]MobileNetV2 ImageNet weights are not cached: training from random init[/yellow]")
    config = TrainConfig(
        backbone="mobilenet_v2", weights=weights, resize=72, image_size=64, rotation=5,
        color_jitter=0.1, lr=1e-3, batch_size=16, epochs=epochs,
    )
    factory = _database(settings)
    with session_scope(factory) as session:
        run_id = create_run(session, config, data, SplitConfig(val=0.2, test=0.2)).id
    console.print(f"run {run_id} created in {settings.database_url}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        train_run(factory, run_id, settings.artifacts, hooks=ProgressHooks(factory, run_id, progress, epochs))
    with session_scope(factory) as session:
        detail = run_detail(session, run_id)
    console.print(f"run {run_id} {detail['status']}: best val accuracy {_fmt(detail['best_metric'])} "
                  f"at epoch {detail['best_epoch']}; checkpoints in {detail['checkpoint_dir']}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()  # usage errors exit 2 inside, with Typer's message
    except USER_ERRORS as error:
        console.print(f"[red]error:[/red] {error}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
