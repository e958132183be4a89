"""The Celery app, configured from the environment (embedded defaults when unset).

Settings for hour-long GPU tasks: JSON only; acks late and reject on worker loss, so a
message is redelivered rather than lost; prefetch 1, so a busy worker holds no queued
runs; task events on for Flower; a broker visibility timeout longer than any run. None
of this decides who trains a run: the lease in SQL does (realfake.runs).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from celery import Celery
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from kombu import Exchange, Queue

from realfake.config import Settings

log = logging.getLogger(__name__)

TRAIN_QUEUE, SCORE_QUEUE = "train", "score"
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600  # longer than any run: a slow run is never redelivered


def broker_transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem:"):
        folder = settings.home / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # the default is ./control in the working directory
            "store_processed": False,
            # kombu's default, 1 s, is a pause between any two tasks: a worker would score at most one shard a second
            "polling_interval": settings.broker_poll_s,
        }
    return {"visibility_timeout": VISIBILITY_TIMEOUT_S}


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("realfake", broker=settings.broker_url, include=["worker.tasks"])
    options = broker_transport_options(settings)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,  # results live in SQL
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        broker_transport_options=options,
        result_backend_transport_options=options,
        broker_connection_retry_on_startup=True,
        # each queue its own exchange and key: a bare Queue(name) would be bound to the default
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in (TRAIN_QUEUE, SCORE_QUEUE)],
        task_default_queue=TRAIN_QUEUE,
        task_routes={
            "train_run": {"queue": TRAIN_QUEUE, "routing_key": TRAIN_QUEUE},
            "score_batch": {"queue": SCORE_QUEUE, "routing_key": SCORE_QUEUE},
            "ping": {"queue": SCORE_QUEUE, "routing_key": SCORE_QUEUE},
        },
        worker_hijack_root_logger=False,
    )
    # an attribute, not app.conf: `celery inspect conf` and Flower's worker pages publish the
    # conf, JSON-encoded field by field, and these settings hold the database URL's password
    app.realfake_settings = settings
    return app


app = make_app()


def enqueue_runs(celery: Celery, run_ids: Iterable[int]) -> None:
    """One train_run message per run, taken by workers in this order."""
    for run_id in run_ids:
        _send_in_order(celery, "train_run", [run_id], TRAIN_QUEUE)


def enqueue_shards(celery: Celery, shards: Iterable[tuple[int, int]]) -> None:
    """One score_batch message per (job id, shard), taken by workers in this order."""
    for job_id, shard in shards:
        _send_in_order(celery, "score_batch", [job_id, shard], SCORE_QUEUE)


def _send_in_order(celery: Celery, task: str, args: list, queue: str) -> None:
    celery.send_task(task, args=args, queue=queue)
    if celery.conf.broker_url.startswith("filesystem:"):
        # The filesystem transport names messages by the millisecond and reads them in name
        # order: two sent in the same millisecond would be taken in random order.
        time.sleep(0.0015)


class StaleRunSweeper(threading.Thread):
    """Runs in every worker's main process: requeues runs whose worker went silent, and sends
    again the messages that may have been lost.

    This is what recovers a run whose whole worker machine disappeared: any surviving or
    newly started worker notices the stale heartbeat in SQL within `interval_s` and
    enqueues the run again; the claim in SQL lets exactly one worker take it over, and it
    resumes from the last checkpoint. A message delivered to a worker just as the broker
    went down can be left unacknowledged in the broker until its visibility timeout (days):
    runs still unclaimed and scoring jobs with missing rows and no progress for
    `REALFAKE_RESEND_AFTER_S` get their messages once more. A shard whose worker died while
    scoring it (its lease in SQL without a heartbeat for `REALFAKE_LEASE_GRACE_S`) is sent
    again then, not after the job's stall.
    """

    def __init__(self, celery: Celery, interval_s: float):
        super().__init__(name="stale-run-sweeper", daemon=True)
        self.celery, self.interval_s = celery, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        from realfake.runs import requeue_stale_runs, resend_waiting_runs
        from realfake.scoring import resend_abandoned_shards, resend_missing_shards
        from realfake.store import make_engine, migrate, session_factory

        settings: Settings = self.celery.realfake_settings
        engine = make_engine(settings.database_url)
        factory = session_factory(engine)
        migrated = False
        while True:
            try:
                if not migrated:  # a worker may be the first to touch an embedded database
                    migrate(engine)
                    migrated = True
                runs = requeue_stale_runs(factory, settings.lease_grace_s)
                runs += resend_waiting_runs(factory, settings.resend_after_s)
                enqueue_runs(self.celery, runs)
                shards = resend_abandoned_shards(factory, settings.lease_grace_s)
                shards += resend_missing_shards(factory, settings.resend_after_s, settings.lease_grace_s)
                enqueue_shards(self.celery, dict.fromkeys(shards))  # a shard on both lists sent once
            except Exception:  # the database or broker is down: try again later
                log.exception("stale-run sweep failed")
            if self.stopped.wait(self.interval_s):
                break
        engine.dispose()


_sweeper: StaleRunSweeper | None = None


@worker_ready.connect
def _start_sweeper(sender=None, **_) -> None:
    global _sweeper
    settings: Settings = app.realfake_settings
    _sweeper = StaleRunSweeper(app, interval_s=max(1.0, settings.lease_grace_s / 4))
    _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_) -> None:
    if _sweeper is not None:
        _sweeper.stopped.set()
    if os.environ.get(STOPPING_FLAG):  # the pool has ended: the flag has no reader left
        Path(os.environ[STOPPING_FLAG]).unlink(missing_ok=True)


STOPPING_FLAG = "REALFAKE_STOPPING_FLAG"


def worker_stopping() -> bool:
    """In a pool process: whether its worker was told to stop. A file its main process makes,
    named in the environment the pool inherits (with fork or spawn alike): a stopping worker
    may still be handed messages, and must not claim runs."""
    flag = os.environ.get(STOPPING_FLAG)
    return bool(flag) and os.path.exists(flag)


class HandBack(threading.Thread):
    """Runs in every worker's main process, idle until the worker is told to stop (SIGTERM,
    a first Ctrl-C, `docker compose stop`): then puts the runs it trains back in the queue,
    their attempts not counted, so the worker ends at its training process's next batch
    instead of at the run's end, and the run goes on elsewhere from its last checkpoint at once
    rather than after `REALFAKE_LEASE_GRACE_S`. Again every second while the process lives:
    a message can still reach this worker, or one stopping beside it, after the first time.
    If the database cannot be reached, the lease runs out as for a lost worker."""

    def __init__(self, celery: Celery, interval_s: float = 1.0):
        super().__init__(name="hand-back", daemon=True)
        self.celery, self.interval_s = celery, interval_s
        self.worker: str | None = None

    def request(self, worker: str) -> None:
        """Safe in a signal handler, even one interrupting itself: a plain assignment, no lock."""
        self.worker = worker

    def run(self) -> None:
        from realfake.runs import hand_back_runs
        from realfake.store import make_engine, session_factory

        while self.worker is None:
            time.sleep(0.2)
        flag = os.environ.get(STOPPING_FLAG)
        if flag:  # before the first hand back, so the pool claims none of these runs again
            Path(flag).touch()
        settings: Settings = self.celery.realfake_settings
        factory = session_factory(make_engine(settings.database_url))
        complained = False
        while True:
            try:
                runs = hand_back_runs(factory, self.worker, settings.lease_grace_s)
            except Exception:
                if not complained:
                    log.exception("could not hand back the runs of %s; each is taken over when its lease "
                                  "runs out", self.worker)
                complained, runs = True, []
            for run_id in runs:
                log.warning("run %d handed back at shutdown: the next worker to claim it resumes it from its "
                            "last checkpoint", run_id)
            try:
                enqueue_runs(self.celery, runs)
            except Exception:
                log.exception("runs %s were handed back but their messages could not be sent; any worker's "
                              "sweeper sends them again after REALFAKE_RESEND_AFTER_S", runs)
            time.sleep(self.interval_s)


_hand_back: HandBack | None = None


@worker_init.connect
def _name_stopping_flag(**_) -> None:
    # before the pool starts, so its processes inherit the name; one file per worker process
    os.environ[STOPPING_FLAG] = str(Path(tempfile.gettempdir()) / f"realfake-stopping-{os.getpid()}-{secrets.token_hex(4)}")


@worker_ready.connect
def _start_hand_back(sender=None, **_) -> None:
    global _hand_back
    _hand_back = HandBack(app)
    _hand_back.start()


@worker_shutting_down.connect
def _hand_back_on_shutdown(sender=None, **_) -> None:
    # inside the main process's signal handler: nothing here may wait on a lock the
    # interrupted thread could hold, so the work is the thread's, started with the worker
    if _hand_back is not None:
        _hand_back.request(str(sender))


@worker_process_init.connect
def _allow_loader_processes(**_) -> None:
    """The prefork pool's processes are daemonic, and a daemonic process may not start any:
    lift that, so a run's DataLoader can start its loader processes (`num_workers`). Those
    watch their parent and end with it, also when a killed task's process leaves them behind."""
    multiprocessing.current_process().daemon = False
