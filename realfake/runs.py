"""Runs in SQL: create one with its recorded split, lease it, train it, write its rows.

Who trains a run is decided here, not by the broker: a message may arrive twice, late, or
after a crash. `claim_run` is a compare-and-set on the run row (WAITING, or RUNNING with a
stale heartbeat, becomes RUNNING with attempt + 1); a heartbeat thread stamps the lease
with the database clock; every later write is fenced by the attempt number, so a worker
that lost its lease can no longer change the run.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from realfake.config import SplitConfig, TrainConfig, decoded_cache_dir
from realfake.errors import RunNotFound, RunStateError, SpecError
from realfake.hooks import BestSoFar, FitResult, TrainHooks
from realfake.metrics import Metrics
from realfake.pruning import asha_prune_hook
from realfake.samples import (
    check_images,
    discover,
    samples_from_json,
    samples_to_json,
    stratified_split,
)
from realfake.store import (
    EpochMetric,
    LeaseHeartbeat,
    Run,
    RunStatus,
    Sweep,
    database_cutoff,
    session_scope,
    upsert,
)
from realfake.sweeps import SweepSpec, expand

log = logging.getLogger(__name__)

# Asked after each epoch whether the run should stop early (the sweep's pruner).
PruneHook = Callable[[Session, int, int, dict[str, Metrics]], bool]


class LeaseLost(RuntimeError):
    """Another worker took the run over; this one must stop writing."""


@dataclass(frozen=True)
class Lease:
    run_id: int
    worker: str
    attempt: int


def create_run(
    session: Session,
    config: TrainConfig,
    data_root: Path | str,
    split: SplitConfig,
    sweep_id: int | None = None,
    split_parts: dict | None = None,
    max_attempts: int = 3,
    fold: int | None = None,
) -> Run:
    """Add a WAITING run with its split recorded (computed here unless given)."""
    root = Path(data_root).absolute()
    if split_parts is None:
        samples = discover(root)
        check_images(root, samples)
        split_parts = samples_to_json(stratified_split(samples, split, fold))
    run = Run(
        sweep_id=sweep_id,
        config=config.model_dump(mode="json"),
        data_root=str(root),
        split=split_parts,
        fold=fold,
        status=RunStatus.WAITING,
        max_attempts=max_attempts,
    )
    session.add(run)
    session.flush()
    return run


def sweep_data(
    spec: SweepSpec, data: Path | str | None = None, roots: tuple[Path, ...] = ()
) -> tuple[Path, dict[int | None, dict[str, list[list]]]]:
    """The sweep's data folder and its split (one per fold, keyed by fold; None without folds),
    after checking the folder, its classes and that every image decodes."""
    folder = data or spec.data
    if not folder:
        raise SpecError("data: no data folder: set `data:` in the sweep file or pass --data")
    root = Path(folder).absolute()
    if not root.is_dir():
        raise SpecError(f"data: folder {root} does not exist")
    samples = discover(root, roots or None)
    check_images(root, samples)
    folds = range(spec.split.folds) if spec.split.folds else [None]
    return root, {fold: samples_to_json(stratified_split(samples, spec.split, fold)) for fold in folds}


def create_sweep(
    session: Session, spec: SweepSpec, data: Path | str | None = None, roots: tuple[Path, ...] = ()
) -> tuple[Sweep, list[Run]]:
    """The sweep and its WAITING runs, sharing one split (with `split.folds`, one run of each
    variant per fold); nothing is enqueued here.

    Everything is checked before the first row is added: the spec (already parsed), the
    data folder and its classes, the split. The caller commits, then enqueues.
    """
    root, split_parts = sweep_data(spec, data, roots)
    folds = list(split_parts)
    configs = [TrainConfig.model_validate(variant) for variant in expand(spec)]
    sweep = Sweep(
        name=spec.name,
        spec=spec.model_dump(mode="json") | {"data": str(root)},
        metric_name=spec.metric.name,
        metric_goal=spec.metric.goal,
    )
    session.add(sweep)
    session.flush()
    runs = [
        create_run(session, config, root, spec.split, sweep.id, split_parts[fold], spec.max_attempts, fold)
        for config in configs
        for fold in folds
    ]
    return sweep, runs


def record_epoch(
    session: Session, run_id: int, epoch: int, metrics: dict[str, Metrics], attempt: int = 1
) -> None:
    """Upsert one row per split: a repeated epoch overwrites, never duplicates."""
    rows = [
        {"run_id": run_id, "epoch": epoch, "split": split, "attempt": attempt, **m.as_dict()}
        for split, m in metrics.items()
    ]
    upsert(session, EpochMetric, rows, keys=("run_id", "epoch", "split"))


def epoch_rows(session: Session, run_id: int) -> list[EpochMetric]:
    """A run's metric rows by epoch, each epoch's in the order train, val, test."""
    in_order = case({"train": 0, "val": 1, "test": 2}, value=EpochMetric.split, else_=3)
    return list(
        session.scalars(select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch, in_order))
    )


def new_checkpoint_dir(artifacts: Path | str, run_id: int) -> Path:
    """A folder no other run uses, even if ids restart in a fresh database over old artifacts."""
    return Path(artifacts) / "runs" / f"{run_id}-{secrets.token_hex(4)}"


def _stale(cutoff) -> object:
    return and_(Run.status == RunStatus.RUNNING, or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < cutoff))


def _held_by(lease: Lease):
    return and_(Run.id == lease.run_id, Run.attempt == lease.attempt, Run.status == RunStatus.RUNNING)


def claim_run(
    factory: sessionmaker[Session], run_id: int, worker: str, artifacts: Path | str, grace_s: float
) -> Lease | None:
    """Take the run if it is waiting, or running under a stale lease; None if it is not ours."""
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id} does not exist")
        if run.cancel_requested and run.status is RunStatus.WAITING:
            run.status, run.finished_at = RunStatus.CANCELLED, func.now()
            return None
        cutoff = database_cutoff(session, grace_s)
        claimed = session.execute(
            update(Run)
            .where(
                Run.id == run_id,
                Run.attempt < Run.max_attempts,
                or_(Run.status == RunStatus.WAITING, _stale(cutoff)),
            )
            .values(
                status=RunStatus.RUNNING,
                attempt=Run.attempt + 1,
                worker=worker,
                heartbeat_at=func.now(),
                started_at=func.coalesce(Run.started_at, func.now()),
                checkpoint_dir=func.coalesce(Run.checkpoint_dir, str(new_checkpoint_dir(artifacts, run_id))),
                error=None,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if not claimed:
            _fail_if_out_of_attempts(session, run_id, cutoff)
            return None
        attempt = session.scalar(select(Run.attempt).where(Run.id == run_id))
    log.info("run %d claimed by %s (attempt %d)", run_id, worker, attempt)
    return Lease(run_id, worker, attempt)


def _fail_if_out_of_attempts(session: Session, run_id: int, cutoff) -> bool:
    worker, attempt = session.execute(select(Run.worker, Run.attempt).where(Run.id == run_id)).one()
    failed = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.attempt >= Run.max_attempts, _stale(cutoff))
        .values(
            status=RunStatus.FAILED,
            finished_at=func.now(),
            error=f"out of attempts: its worker was lost on attempt {attempt}, the last allowed (attempts handed "
                  f"back at a worker's shutdown not counted; last worker: {worker}); `retry` gives it more",
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    return bool(failed)


def requeue_stale_runs(factory: sessionmaker[Session], grace_s: float) -> list[int]:
    """Runs whose worker went silent: back to WAITING (for the caller to enqueue) or FAILED.

    Each transition is a compare-and-set, so when several workers sweep at once only one
    of them requeues a given run.
    """
    requeued = []
    with session_scope(factory) as session:
        cutoff = database_cutoff(session, grace_s)
        stale = session.execute(select(Run.id, Run.attempt).where(_stale(cutoff))).all()
        for run_id, attempt in stale:
            if _fail_if_out_of_attempts(session, run_id, cutoff):
                log.warning("run %d failed: its worker was lost on attempt %d, the last allowed", run_id, attempt)
                continue
            moved = session.execute(
                update(Run)
                .where(Run.id == run_id, Run.attempt == attempt, _stale(cutoff))
                .values(status=RunStatus.WAITING, worker=None)
                .execution_options(synchronize_session=False)
            ).rowcount
            if moved:
                log.warning("run %d: worker lost during attempt %d, requeued", run_id, attempt)
                requeued.append(run_id)
    return requeued


def hand_back_runs(factory: sessionmaker[Session], worker: str, grace_s: float) -> list[int]:
    """The runs `worker` is training, back to waiting for the caller to enqueue, without
    charging the attempt: the worker was asked to stop, it did not fail. Each resumes from its
    last checkpoint on whichever worker claims it next; a run whose cancel was asked ends
    cancelled instead. A compare-and-set per run and attempt, so the holder's writes are
    fenced from here on. Only live leases: a stale one left by an earlier process of the same
    name is a lost attempt, for the sweeper to count."""
    handed = []
    with session_scope(factory) as session:
        cutoff = database_cutoff(session, grace_s)
        held = session.execute(
            select(Run.id, Run.attempt, Run.cancel_requested)
            .where(Run.worker == worker, Run.status == RunStatus.RUNNING, Run.heartbeat_at >= cutoff)
        ).all()
        for run_id, attempt, cancelled in held:
            if cancelled:
                values = {"status": RunStatus.CANCELLED, "finished_at": func.now()}
            else:
                values = {"status": RunStatus.WAITING, "worker": None, "max_attempts": Run.max_attempts + 1,
                          "enqueued_at": func.now()}
            moved = session.execute(
                update(Run)
                .where(Run.id == run_id, Run.attempt == attempt, Run.status == RunStatus.RUNNING)
                .values(**values)
                .execution_options(synchronize_session=False)
            ).rowcount
            if moved and not cancelled:
                handed.append(run_id)
    return handed


def resend_waiting_runs(factory: sessionmaker[Session], after_s: float) -> list[int]:
    """Waiting runs whose message may have been lost (sent more than `after_s` ago and still
    unclaimed, e.g. delivered to a worker as the broker went down): the caller sends them
    again, at most once per `after_s`; a duplicate is refused by the claim."""
    resend = []
    with session_scope(factory) as session:
        cutoff = database_cutoff(session, after_s)
        last_sent = func.coalesce(Run.enqueued_at, Run.created_at)
        waiting = session.execute(
            select(Run.id).where(Run.status == RunStatus.WAITING, Run.cancel_requested.is_(False), last_sent < cutoff)
        ).scalars().all()
        for run_id in waiting:
            # compare-and-set on the condition, not on the stamp read: SQLite keeps
            # CURRENT_TIMESTAMP's text, which a datetime read back and bound again never equals
            if session.execute(
                update(Run).where(Run.id == run_id, Run.status == RunStatus.WAITING, last_sent < cutoff)
                .values(enqueued_at=func.now()).execution_options(synchronize_session=False)
            ).rowcount:
                resend.append(run_id)
    return resend


def finish_run(
    factory: sessionmaker[Session], lease: Lease, status: RunStatus, error: str | None = None
) -> bool:
    """Record the end of the attempt; False if the lease had already been lost."""
    with session_scope(factory) as session:
        return bool(
            session.execute(
                update(Run)
                .where(_held_by(lease))
                .values(status=status, error=error, finished_at=func.now(), heartbeat_at=func.now())
                .execution_options(synchronize_session=False)
            ).rowcount
        )


class Heartbeat(LeaseHeartbeat):
    """Stamps the run's lease every `interval_s`; notices when the lease was taken away."""

    def __init__(self, factory: sessionmaker[Session], lease: Lease, interval_s: float):
        stamp = update(Run).where(_held_by(lease)).values(heartbeat_at=func.now())
        super().__init__(factory, stamp, interval_s, name=f"heartbeat of run {lease.run_id}")
        self.lease = lease


class SqlHooks(TrainHooks):
    """Persists each epoch (fenced by the lease), reads the cancel flag, asks the pruner."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        run_id: int,
        poll_s: float = 2.0,
        prune: PruneHook | None = asha_prune_hook,
    ):
        self.factory = factory
        self.run_id = run_id
        self.poll_s = poll_s
        self.prune = prune
        self.lease: Lease | None = None
        self.heartbeat: Heartbeat | None = None
        self._next_poll = 0.0
        self._cancelled = False

    def should_stop(self) -> bool:
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            return True
        now = time.monotonic()
        if not self._cancelled and now >= self._next_poll:
            self._next_poll = now + self.poll_s
            with session_scope(self.factory) as session:
                cancel, status, attempt = session.execute(
                    select(Run.cancel_requested, Run.status, Run.attempt).where(Run.id == self.run_id)
                ).one()
            self._cancelled = bool(cancel)
            # handed back or taken over: seen here within poll_s, sooner than the next heartbeat
            if self.lease and self.heartbeat and (status is not RunStatus.RUNNING or attempt != self.lease.attempt):
                self.heartbeat.lost.set()
                return True
        return self._cancelled

    def check_held(self) -> None:
        if self.lease is None:
            return
        try:
            with session_scope(self.factory) as session:
                held = session.scalar(select(Run.id).where(_held_by(self.lease))) is not None
        except Exception:  # a database blip: the epoch's rows, just written, were fenced; keep the files too
            log.warning("run %d: could not check the lease before writing checkpoints; writing them", self.run_id,
                        exc_info=True)
            return
        if not held:
            raise LeaseLost(f"run {self.run_id} is no longer this worker's: its checkpoints are left as they were")

    def on_epoch_end(self, epoch: int, metrics: dict[str, Metrics], best: BestSoFar) -> bool:
        where = _held_by(self.lease) if self.lease else Run.id == self.run_id
        attempt = self.lease.attempt if self.lease else 1
        with session_scope(self.factory) as session:
            held = session.execute(
                update(Run)
                .where(where)
                .values(epochs_done=epoch, best_epoch=best.epoch, best_metric=best.value, heartbeat_at=func.now())
                .execution_options(synchronize_session=False)
            ).rowcount
            if not held:
                raise LeaseLost(f"run {self.run_id} was taken over by another worker")
            record_epoch(session, self.run_id, epoch, metrics, attempt)
            keep_going = not (self.prune and self.prune(session, self.run_id, epoch, metrics))
        val = metrics.get("val")
        log.info(
            "run %d epoch %d: train acc %.3f, val acc %s",
            self.run_id, epoch, metrics["train"].accuracy, f"{val.accuracy:.3f}" if val else "-",
        )
        return keep_going


def _oom_message(error: BaseException, config: TrainConfig) -> str:
    return (
        f"out of memory ({error.__class__.__name__}) at batch_size {config.batch_size}, "
        f"image_size {config.image_size}, backbone {config.backbone}: lower batch_size or "
        f"image_size, or use a GPU with more memory"
    )


def train_run(
    factory: sessionmaker[Session],
    run_id: int,
    artifacts: Path | str,
    worker: str = "local",
    hooks: SqlHooks | None = None,
    grace_s: float = 120.0,
    heartbeat_s: float = 10.0,
) -> FitResult | None:
    """Claim a run and train it to its end in this process; None if it was not ours to train
    (already claimed, finished or cancelled).

    Succeeded, cancelled and pruned runs end so; an exception fails the run with its
    message (an out-of-memory error included, rather than retrying into it again). A crash
    of the process leaves the run RUNNING until its heartbeat goes stale and it is taken over.
    """
    import torch  # here, not at the top: the scheduler uses this module without loading torch

    from realfake.train import fit

    lease = claim_run(factory, run_id, worker, artifacts, grace_s)
    if lease is None:
        return None
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        raw_config, data_root, split, ckpt = run.config, run.data_root, samples_from_json(run.split), Path(run.checkpoint_dir)
    try:
        config = TrainConfig.model_validate(raw_config)
    except ValidationError as error:  # e.g. a field added by a newer scheduler: fail now, not at lease expiry
        return _failed(factory, lease, f"this worker cannot read the run's config (is realfake older here than "
                                       f"where the run was submitted? upgrade the workers): {error}")
    hooks = hooks or SqlHooks(factory, run_id)
    hooks.lease = lease
    hooks.heartbeat = Heartbeat(factory, lease, heartbeat_s)
    hooks.heartbeat.start()
    try:
        result = fit(config, data_root, split, ckpt, hooks, cache_dir=decoded_cache_dir(artifacts))
    except LeaseLost:
        log.warning("run %d: lease lost, leaving it to its new worker", run_id)
        return FitResult("lease lost")
    except torch.OutOfMemoryError as error:
        return _failed(factory, lease, _oom_message(error, config))
    except Exception as error:
        finish_run(factory, lease, RunStatus.FAILED, f"{type(error).__name__}: {error}")
        raise
    finally:
        hooks.heartbeat.stop()
    if result.outcome == "stopped" and hooks.heartbeat.lost.is_set():
        log.warning("run %d: no longer this worker's (handed back at shutdown, or taken over); stopped", run_id)
        return FitResult("lease lost")
    status = {"completed": RunStatus.SUCCEEDED, "stopped": RunStatus.CANCELLED, "pruned": RunStatus.PRUNED}
    if not finish_run(factory, lease, status[result.outcome]):  # taken over after the last epoch
        log.warning("run %d: lease lost before its end was recorded, leaving it to its new worker", run_id)
        return FitResult("lease lost")
    return result


def _failed(factory: sessionmaker[Session], lease: Lease, reason: str) -> FitResult:
    """Fail the run with `reason`, said in the worker's log too; the task returns, not raises
    (Celery would not retry it, but the reason belongs to the run, not to a traceback)."""
    if not finish_run(factory, lease, RunStatus.FAILED, reason):
        log.warning("run %d: lease lost, leaving it to its new worker", lease.run_id)
        return FitResult("lease lost")
    log.error("run %d failed: %s", lease.run_id, reason)
    return FitResult("failed")


def retry_runs(factory: sessionmaker[Session], run_ids: Sequence[int]) -> None:
    """Put failed or cancelled runs back to waiting, all or none, each with as many attempts
    again as it was allowed; each resumes from its last checkpoint. The caller enqueues them.
    Attempt numbers only grow, so a lost worker of an earlier attempt stays fenced out."""
    run_ids = list(dict.fromkeys(run_ids))  # `retry 3 3` is one retry
    with session_scope(factory) as session:
        runs = [session.get(Run, run_id) for run_id in run_ids]
        for run_id, run in zip(run_ids, runs):
            if run is None:
                raise RunNotFound(f"run {run_id} does not exist")
            if run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
                raise RunStateError(f"run {run_id} is {run.status.value}: only failed or cancelled runs are retried")
        for run in runs:
            run.status, run.error, run.finished_at, run.cancel_requested = RunStatus.WAITING, None, None, False
            # the budget it was given at first (its sweep's), not the cap an earlier retry raised
            allowed = run.sweep.spec.get("max_attempts", 3) if run.sweep is not None else 3
            run.max_attempts, run.enqueued_at = run.attempt + allowed, func.now()


def request_cancel(factory: sessionmaker[Session], run_id: int) -> RunStatus:
    """Set the cancel flag (checked between batches); a waiting run is cancelled at once."""
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id} does not exist")
        if not run.status.is_finished():
            run.cancel_requested = True
            if run.status is RunStatus.WAITING:
                run.status, run.finished_at = RunStatus.CANCELLED, func.now()
        return run.status
