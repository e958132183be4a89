"""The tasks: each re-reads the world from SQL by id and is safe to deliver twice."""

from __future__ import annotations

import os
import time

from celery.exceptions import Reject
from sqlalchemy.orm import Session, sessionmaker

from realfake.config import Settings
from realfake.inference import ModelCache, score_shard
from realfake.runs import train_run as train
from realfake.store import make_engine, session_factory
from worker.celery import app, worker_stopping

_factories: dict[int, sessionmaker[Session]] = {}
_models = ModelCache(precision=app.realfake_settings.score_precision)


def _factory() -> sessionmaker[Session]:
    """One engine per process: connections must not cross a fork."""
    pid = os.getpid()
    if pid not in _factories:
        _factories[pid] = session_factory(make_engine(_settings().database_url))
    return _factories[pid]


def _settings() -> Settings:
    return app.realfake_settings


@app.task(name="train_run", bind=True)
def train_run(self, run_id: int) -> str:
    """Train run `run_id` if its lease in SQL lets this worker; resume from its checkpoint."""
    if worker_stopping():  # told to stop: back to the queue for another worker, after a pause, not spinning
        time.sleep(1.0)
        raise Reject(f"worker stopping: run {run_id} left to another", requeue=True)
    settings = _settings()
    result = train(
        _factory(), run_id, settings.artifacts, worker=self.request.hostname or "worker",
        grace_s=settings.lease_grace_s, heartbeat_s=settings.heartbeat_s,
    )
    return "not claimed" if result is None else result.outcome


@app.task(name="score_batch", bind=True)
def score_batch(self, job_id: int, shard: int) -> int:
    """Score one shard of scoring job `job_id`: one prediction row per file, under a lease on the shard."""
    settings = _settings()
    return score_shard(_factory(), job_id, shard, settings.data_roots, _models,
                       worker=self.request.hostname, heartbeat_s=settings.heartbeat_s)


@app.task(name="ping")
def ping() -> None:
    """Does nothing: the dispatch latency of an empty task (bench/queue_overhead.py)."""
