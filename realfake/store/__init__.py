"""Persistence: SQLAlchemy models, sessions, Alembic migrations."""

from realfake.store.models import (
    Base,
    EpochMetric,
    JobStatus,
    Prediction,
    Run,
    RungValue,
    RunStatus,
    ScoringJob,
    ShardLease,
    Sweep,
)
from realfake.store.session import (
    LeaseHeartbeat,
    database_cutoff,
    make_engine,
    migrate,
    session_factory,
    session_scope,
    upsert,
)

__all__ = [
    "Base",
    "EpochMetric",
    "JobStatus",
    "LeaseHeartbeat",
    "Prediction",
    "Run",
    "RunStatus",
    "RungValue",
    "ScoringJob",
    "ShardLease",
    "database_cutoff",
    "Sweep",
    "make_engine",
    "migrate",
    "session_factory",
    "session_scope",
    "upsert",
]
