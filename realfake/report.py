"""Plain-data views of runs for the command line and scripts."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from realfake.runs import RunNotFound, epoch_rows
from realfake.store import Run

EPOCH_FIELDS = ("loss", "accuracy", "precision", "recall", "f1", "roc_auc", "tp", "fp", "tn", "fn", "group_accuracy")


def run_summary(run: Run) -> dict:
    return {
        "id": run.id,
        "sweep_id": run.sweep_id,
        "status": run.status.value,
        "backbone": run.config.get("backbone"),
        "epochs_done": run.epochs_done,
        "epochs": run.config.get("epochs"),
        "best_epoch": run.best_epoch,
        "best_metric": run.best_metric,
        "selection_metric": run.config.get("selection_metric"),
        "attempt": run.attempt,
        "worker": run.worker,
        "error": run.error,
    }


def list_runs(session: Session, sweep_id: int | None = None) -> list[dict]:
    query = select(Run).order_by(Run.id)
    if sweep_id is not None:
        query = query.where(Run.sweep_id == sweep_id)
    return [run_summary(run) for run in session.scalars(query)]


def run_detail(session: Session, run_id: int) -> dict:
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} does not exist")
    epochs = [
        {"epoch": row.epoch, "split": row.split, "n": row.n, **{f: getattr(row, f) for f in EPOCH_FIELDS}}
        for row in epoch_rows(session, run_id)
    ]
    return {
        **run_summary(run),
        "config": run.config,
        "data_root": run.data_root,
        "split_sizes": {name: len(rows) for name, rows in run.split.items()},
        "checkpoint_dir": run.checkpoint_dir,
        "epochs_table": epochs,
    }
