"""Runs in SQL: create one with its recorded split, train it, and write its per-epoch rows.

The thin shells (worker tasks, scheduler commands) call these; they take a session factory
and ids, never ORM objects from another session.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from realfake.config import SplitConfig, TrainConfig
from realfake.data import discover, samples_from_json, samples_to_json, stratified_split
from realfake.metrics import Metrics
from realfake.store import EpochMetric, Run, RunStatus, session_scope, upsert
from realfake.train import BestSoFar, FitResult, TrainHooks, fit

log = logging.getLogger(__name__)


class RunNotFound(LookupError):
    pass


def create_run(
    session: Session,
    config: TrainConfig,
    data_root: Path | str,
    split: SplitConfig,
    sweep_id: int | None = None,
    split_parts: dict | None = None,
) -> Run:
    """Add a WAITING run with its split recorded (computed here unless given)."""
    root = Path(data_root).absolute()
    if split_parts is None:
        split_parts = samples_to_json(stratified_split(discover(root), split))
    run = Run(
        sweep_id=sweep_id,
        config=config.model_dump(mode="json"),
        data_root=str(root),
        split=split_parts,
        status=RunStatus.WAITING,
    )
    session.add(run)
    session.flush()
    return run


def record_epoch(session: Session, run_id: int, epoch: int, metrics: dict[str, Metrics]) -> None:
    """Upsert one row per split: a repeated epoch overwrites, never duplicates."""
    rows = [
        {"run_id": run_id, "epoch": epoch, "split": split, **m.as_dict()} for split, m in metrics.items()
    ]
    upsert(session, EpochMetric, rows, keys=("run_id", "epoch", "split"))


def epoch_rows(session: Session, run_id: int) -> list[EpochMetric]:
    return list(
        session.scalars(
            select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch, EpochMetric.split)
        )
    )


class SqlHooks(TrainHooks):
    """Persists each epoch and reads the run's cancel flag (at most every `poll_s` seconds)."""

    def __init__(self, factory: sessionmaker[Session], run_id: int, poll_s: float = 2.0):
        self.factory = factory
        self.run_id = run_id
        self.poll_s = poll_s
        self._next_poll = 0.0
        self._cancelled = False

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now >= self._next_poll:
            self._next_poll = now + self.poll_s
            with session_scope(self.factory) as session:
                self._cancelled = bool(
                    session.scalar(select(Run.cancel_requested).where(Run.id == self.run_id))
                )
        return self._cancelled

    def on_epoch_end(self, epoch: int, metrics: dict[str, Metrics], best: BestSoFar) -> bool:
        with session_scope(self.factory) as session:
            record_epoch(session, self.run_id, epoch, metrics)
            session.execute(
                update(Run)
                .where(Run.id == self.run_id)
                .values(epochs_done=epoch, best_epoch=best.epoch, best_metric=best.value, heartbeat_at=func.now())
            )
        val = metrics.get("val")
        log.info(
            "run %d epoch %d: train acc %.3f, val acc %s",
            self.run_id,
            epoch,
            metrics["train"].accuracy,
            f"{val.accuracy:.3f}" if val else "-",
        )
        return True


def checkpoint_dir(artifacts: Path | str, run_id: int) -> Path:
    return Path(artifacts) / "runs" / str(run_id)


def train_run(
    factory: sessionmaker[Session],
    run_id: int,
    artifacts: Path | str,
    worker: str = "local",
    hooks: TrainHooks | None = None,
) -> FitResult:
    """Train a run to its end in this process, recording status, rows and checkpoints in SQL."""
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id} does not exist")
        config = TrainConfig.model_validate(run.config)
        data_root, split = run.data_root, samples_from_json(run.split)
        ckpt = checkpoint_dir(artifacts, run_id)
        run.status, run.worker, run.attempt = RunStatus.RUNNING, worker, run.attempt + 1
        run.started_at = run.started_at or func.now()
        run.heartbeat_at, run.checkpoint_dir, run.error = func.now(), str(ckpt), None
    try:
        result = fit(config, data_root, split, ckpt, hooks or SqlHooks(factory, run_id))
    except Exception as error:
        finish_run(factory, run_id, RunStatus.FAILED, f"{type(error).__name__}: {error}")
        raise
    status = {"completed": RunStatus.SUCCEEDED, "stopped": RunStatus.CANCELLED, "pruned": RunStatus.PRUNED}
    finish_run(factory, run_id, status[result.outcome])
    return result


def finish_run(factory: sessionmaker[Session], run_id: int, status: RunStatus, error: str | None = None) -> None:
    with session_scope(factory) as session:
        session.execute(
            update(Run).where(Run.id == run_id).values(status=status, error=error, finished_at=func.now())
        )
