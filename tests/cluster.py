"""Helpers for integration tests with real Redis, PostgreSQL and worker processes."""

from __future__ import annotations

from pathlib import Path

from realfake.config import SplitConfig, TrainConfig
from realfake.runs import create_run
from realfake.store import Run, session_scope
from scheduler.local import WorkerProcess, wait_for

__all__ = ["WorkerProcess", "wait_for", "config", "new_run", "run_state", "wait_finished"]

REPO = Path(__file__).resolve().parents[1]


def config(epochs: int, **overrides) -> TrainConfig:
    values = dict(
        backbone="mobilenet_v2", weights="imagenet", resize=72, image_size=64, rotation=5,
        color_jitter=0.1, lr=1e-3, batch_size=16, epochs=epochs, seed=1,
    )
    return TrainConfig(**(values | overrides))


def new_run(factory, data, cfg) -> int:
    with session_scope(factory) as session:
        return create_run(session, cfg, data, SplitConfig(val=0.2, test=0.2)).id


def run_state(factory, run_id) -> Run:
    with session_scope(factory) as session:
        return session.get(Run, run_id)


def wait_finished(factory, run_id, timeout=240) -> Run:
    return wait_for(lambda: (r := run_state(factory, run_id)).status.is_finished() and r, timeout,
                    what=f"run {run_id} to finish")
