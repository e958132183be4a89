"""Bulk scoring jobs: a folder becomes a job of shards, recorded in SQL; the workers score
the shards (`realfake.inference`), and a lost shard is sent again.

Nothing here loads torch: the scheduler creates jobs and follows their progress without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from realfake.errors import RunNotFound, ScoringError
from realfake.samples import IMAGE_SUFFIXES, ensure_inside
from realfake.store import (
    JobStatus,
    LeaseHeartbeat,
    Prediction,
    Run,
    ScoringJob,
    ShardLease,
    database_cutoff,
    session_scope,
    upsert,
)

log = logging.getLogger(__name__)


def list_files(folder: Path) -> list[str]:
    """Every image-named entry under `folder` (symlinks too: each gets a row), relative, sorted."""
    found = []
    for path in folder.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and (path.is_symlink() or path.is_file()):
            found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def model_checkpoint(run: Run) -> Path:
    """The run's best checkpoint, or its last one if it never improved."""
    if not run.checkpoint_dir:
        raise ScoringError(f"run {run.id} has no checkpoint: it has not trained yet")
    for name in ("best.pt", "last.pt"):
        path = Path(run.checkpoint_dir) / name
        if path.is_file():
            return path
    raise ScoringError(f"run {run.id} has no checkpoint in {run.checkpoint_dir}")


def check_scorable(session: Session, run_ids: Sequence[int]) -> None:
    """Raise unless every run exists and has a checkpoint."""
    for each in run_ids:
        run = session.get(Run, each)
        if run is None:
            raise RunNotFound(f"run {each} does not exist")
        model_checkpoint(run)


def create_scoring_job(
    session: Session,
    run_id: int | Sequence[int],
    folder: Path | str,
    batch_size: int = 64,
    shard_size: int = 256,
    roots: Sequence[Path] = (),
    tta: bool = False,
    threshold: float = 0.5,
) -> ScoringJob:
    """A job over every image under `folder`, scored by one run or by the mean P(fake) of several.

    `tta`: each P(fake) is also the mean over the mirror image; `threshold`: the P(fake) from
    which a file is labelled fake (`evaluate` reports the one chosen on validation).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ScoringError(f"threshold {threshold} is not a probability in [0, 1]")
    run_ids = [run_id] if isinstance(run_id, int) else list(dict.fromkeys(run_id))
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise ScoringError(f"folder {folder} does not exist or is not a folder")
    if roots:
        ensure_inside(folder, roots)
    check_scorable(session, run_ids)
    files = list_files(folder)
    shards = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
    job = ScoringJob(
        run_id=run_ids[0],
        run_ids=run_ids if len(run_ids) > 1 else None,
        folder=str(folder),
        n_files=len(files),
        n_shards=len(shards),
        batch_size=batch_size,
        tta=tta,
        threshold=threshold,
        shards=shards,
        status=JobStatus.DONE if not files else JobStatus.WAITING,
    )
    session.add(job)
    session.flush()
    return job


def resend_missing_shards(
    factory: sessionmaker[Session], after_s: float, lease_grace_s: float | None = None
) -> list[tuple[int, int]]:
    """Shards of unfinished jobs that made no progress for `after_s` and still miss rows:
    their messages may have been lost (delivered as the broker went down). The caller sends
    them again, at most once per `after_s` per job; a duplicate only upserts the same rows.
    A shard whose lease was stamped within `lease_grace_s` is being scored: not sent."""
    resend = []
    with session_scope(factory) as session:
        cutoff = database_cutoff(session, after_s)
        lease_cutoff = None if lease_grace_s is None else database_cutoff(session, lease_grace_s)
        last = func.coalesce(ScoringJob.progress_at, ScoringJob.created_at)
        stalled = session.scalars(
            select(ScoringJob.id).where(ScoringJob.status != JobStatus.DONE, last < cutoff)
        ).all()
        for job_id in stalled:
            # compare-and-set on the condition itself, not on the stamp read: SQLite keeps
            # CURRENT_TIMESTAMP's text, which a datetime read back and bound again never equals
            claimed = session.execute(
                update(ScoringJob).where(ScoringJob.id == job_id, last < cutoff).values(progress_at=func.now())
                .execution_options(synchronize_session=False)
            ).rowcount
            if not claimed:
                continue  # another sweeper took it
            job = session.get(ScoringJob, job_id)
            written = dict(session.execute(
                select(Prediction.shard, func.count()).where(Prediction.job_id == job_id).group_by(Prediction.shard)
            ).all())
            scoring = set() if lease_cutoff is None else set(session.scalars(
                select(ShardLease.shard).where(ShardLease.job_id == job_id, ShardLease.heartbeat_at >= lease_cutoff)
            ))
            resend += [(job_id, i) for i, files in enumerate(job.shards)
                       if written.get(i, 0) < len(files) and i not in scoring]
    return resend


@contextmanager
def shard_lease(factory: sessionmaker[Session], job_id: int, shard: int, worker: str, heartbeat_s: float) -> Iterator[None]:
    """Hold the shard's lease while the block scores it: stamped every `heartbeat_s` by a
    thread, dropped when the block ends, whether it wrote the rows or raised. Only a worker
    that dies mid-shard leaves the lease behind, for `resend_abandoned_shards`."""
    with session_scope(factory) as session:
        upsert(session, ShardLease, [{"job_id": job_id, "shard": shard, "worker": worker, "heartbeat_at": func.now()}],
               keys=("job_id", "shard"))
    mine = (ShardLease.job_id == job_id, ShardLease.shard == shard, ShardLease.worker == worker)
    stamp = update(ShardLease).where(*mine).values(heartbeat_at=func.now())
    beating = LeaseHeartbeat(factory, stamp, heartbeat_s, name=f"lease of job {job_id} shard {shard}")
    beating.start()
    try:
        yield
    finally:
        beating.stop()
        beating.join(timeout=5)  # a beat stuck on the database must not hold the task; the thread is a daemon
        if beating.lost.is_set():  # a sweeper judged it stale, or a copy of the shard took it: the rows are upserted alike
            log.warning("job %d shard %d: the shard's lease was no longer %s's while it scored", job_id, shard, worker)
        try:
            with session_scope(factory) as session:
                session.execute(delete(ShardLease).where(*mine).execution_options(synchronize_session=False))
        except Exception:  # left behind: the shard is sent once more, and a complete one is not scored again
            log.warning("job %d shard %d: could not drop the shard's lease", job_id, shard, exc_info=True)


def resend_abandoned_shards(factory: sessionmaker[Session], grace_s: float) -> list[tuple[int, int]]:
    """Shards whose lease went `grace_s` without a heartbeat (their worker died mid-shard) and
    that still miss rows. Each stale lease is dropped by one sweeper only (compare-and-delete
    on the staleness), so each abandoned shard is sent again once; the caller sends them. A
    job whose last shard was written by a worker that died before marking it is marked done."""
    resend = []
    with session_scope(factory) as session:
        cutoff = database_cutoff(session, grace_s)
        stale = session.execute(
            select(ShardLease.job_id, ShardLease.shard, ShardLease.worker).where(ShardLease.heartbeat_at < cutoff)
        ).all()
        for job_id, shard, worker in stale:
            dropped = session.execute(  # on the condition, not the stamp read (see resend_missing_shards)
                delete(ShardLease).where(ShardLease.job_id == job_id, ShardLease.shard == shard,
                                         ShardLease.heartbeat_at < cutoff)
                .execution_options(synchronize_session=False)
            ).rowcount
            job = session.get(ScoringJob, job_id)
            if not dropped or job is None or job.status is JobStatus.DONE:
                continue
            if shard_rows_written(session, job_id, shard) < len(job.shards[shard]):
                log.warning("job %d shard %d: its worker %s went silent mid-shard; sent again", job_id, shard, worker)
                resend.append((job_id, shard))
            else:  # it may have died after the job's last rows, before marking it
                mark_done_if_complete(session, job_id)
    return resend


def job_progress(session: Session, job_id: int) -> tuple[int, int]:
    """(rows written, files in the job)."""
    job = session.get(ScoringJob, job_id)
    if job is None:
        raise LookupError(f"scoring job {job_id} does not exist")
    return rows_written(session, job_id), job.n_files


def rows_written(session: Session, job_id: int) -> int:
    return session.scalar(select(func.count()).select_from(Prediction).where(Prediction.job_id == job_id))


def shard_rows_written(session: Session, job_id: int, shard: int) -> int:
    return session.scalar(select(func.count()).select_from(Prediction)
                          .where(Prediction.job_id == job_id, Prediction.shard == shard))


def mark_done_if_complete(session: Session, job_id: int) -> None:
    """The job done once every file has its row (a no-op if it already is)."""
    session.execute(
        update(ScoringJob)
        .where(ScoringJob.id == job_id, ScoringJob.n_files <= rows_written(session, job_id),
               ScoringJob.status != JobStatus.DONE)
        .values(status=JobStatus.DONE, finished_at=func.now())
        .execution_options(synchronize_session=False)
    )
