"""SQLAlchemy models: sweeps, runs, per-epoch metrics, scoring jobs and predictions.

Changing a model means adding an Alembic migration under `migrations/versions/`; a test
checks that the two agree.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class RunStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"

    def is_finished(self) -> bool:
        return self not in (RunStatus.WAITING, RunStatus.RUNNING)


class JobStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    def is_finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED)


def _enum(kind: type[enum.Enum], name: str) -> Enum:
    # store the lower-case values, as CHECK-constrained strings on every engine
    return Enum(kind, name=name, native_enum=False, length=16, values_callable=lambda k: [m.value for m in k])


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)
    metric_name: Mapped[str] = mapped_column(String(32), default="accuracy")
    metric_goal: Mapped[str] = mapped_column(String(8), default="maximize")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    runs: Mapped[list[Run]] = relationship(back_populates="sweep")


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    data_root: Mapped[str] = mapped_column(Text)
    split: Mapped[dict] = mapped_column(JSON)  # {"train": [[path, label, group], ...], ...}
    fold: Mapped[int | None] = mapped_column(Integer)  # its validation fold, in a cross-validated sweep
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"), default=RunStatus.WAITING, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    best_metric: Mapped[float | None] = mapped_column(Float)
    checkpoint_dir: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # when its message was last sent again by a sweeper (created_at before that)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    sweep: Mapped[Sweep | None] = relationship(back_populates="runs")
    epochs: Mapped[list[EpochMetric]] = relationship(
        back_populates="run", order_by="(EpochMetric.epoch, EpochMetric.split)", cascade="all, delete-orphan"
    )


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch", "split"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(8))
    n: Mapped[int] = mapped_column(Integer)
    # NaN and infinities are stored as NULL (see realfake.metrics.finite_or_none)
    loss: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float] = mapped_column(Float)
    precision: Mapped[float] = mapped_column(Float)
    recall: Mapped[float] = mapped_column(Float)
    f1: Mapped[float] = mapped_column(Float)
    roc_auc: Mapped[float | None] = mapped_column(Float)
    tp: Mapped[int] = mapped_column(Integer)
    fp: Mapped[int] = mapped_column(Integer)
    tn: Mapped[int] = mapped_column(Integer)
    fn: Mapped[int] = mapped_column(Integer)
    group_accuracy: Mapped[dict] = mapped_column(JSON, default=dict)
    attempt: Mapped[int] = mapped_column(Integer, default=1)  # which attempt of the run wrote it
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    run: Mapped[Run] = relationship(back_populates="epochs")


class RungValue(Base):
    """A run's selection metric when it reached an ASHA rung (an epoch count)."""

    __tablename__ = "rung_values"
    __table_args__ = (UniqueConstraint("run_id", "rung"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    rung: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ScoringJob(Base):
    __tablename__ = "scoring_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    run_ids: Mapped[list | None] = mapped_column(JSON)  # an ensemble's runs (run_id is the first); else null
    folder: Mapped[str] = mapped_column(Text)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.WAITING)
    n_files: Mapped[int] = mapped_column(Integer, default=0)
    n_shards: Mapped[int] = mapped_column(Integer, default=0)
    batch_size: Mapped[int] = mapped_column(Integer, default=64)
    # how each file is judged, as `evaluate` does: P(fake) also over the mirror image, and the
    # cut-off for the label (jobs from before these columns were at 0.5, without the mirror)
    tta: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    threshold: Mapped[float] = mapped_column(Float, default=0.5, server_default="0.5")
    shards: Mapped[list] = mapped_column(JSON, default=list)  # [[relative path, ...], ...]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    # last shard written, or last time a sweeper sent its missing shards again
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ShardLease(Base):
    """A shard being scored: the worker stamps `heartbeat_at` while it works and deletes the row
    with the shard's rows. A row whose stamp has gone stale is a worker lost mid-shard: any
    worker's sweeper sends the shard again after REALFAKE_LEASE_GRACE_S, not after the
    whole job has stalled for REALFAKE_RESEND_AFTER_S."""

    __tablename__ = "shard_leases"

    job_id: Mapped[int] = mapped_column(ForeignKey("scoring_jobs.id", ondelete="CASCADE"), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(Text)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("job_id", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("scoring_jobs.id", ondelete="CASCADE"))
    shard: Mapped[int] = mapped_column(Integer, index=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the job's folder
    p_fake: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(8))
    error: Mapped[str | None] = mapped_column(Text)
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
