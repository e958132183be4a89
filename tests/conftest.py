"""Shared fixtures: both databases (SQLite and the machine's PostgreSQL), synthetic data, weights."""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from realfake.config import Settings
from realfake.store import make_engine, migrate, session_factory
from realfake.synthetic import make_synthetic
from worker.celery import make_app

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REALFAKE_SHARED", REPO.parent / "shared"))
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
FACES = SHARED / "data" / "real_and_fake_face"
REDIS = os.environ.get("REALFAKE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
PG_ADMIN_URL = os.environ.get("REALFAKE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def empty_tables(connection) -> None:
    connection.execute(text("TRUNCATE predictions, scoring_jobs, epoch_metrics, runs, sweeps RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def pg_server_url():
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"realfake_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A migrated, empty database on each engine realfake supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'realfake.db'}"
        engine = make_engine(url)
        migrate(engine)
        yield url
        engine.dispose()
        return
    url = request.getfixturevalue("pg_server_url")
    engine = make_engine(url)
    migrate(engine)
    yield url
    with engine.begin() as connection:  # leave the next test an empty schema
        empty_tables(connection)
    engine.dispose()


@pytest.fixture
def factory(db_url):
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), per_class=100, size=64, seed=0)


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    if not MOBILENET_WEIGHTS.is_file():
        pytest.fail(f"{MOBILENET_WEIGHTS} is missing: the tests need the shared MobileNetV2 weights")
    return MOBILENET_WEIGHTS


# --- a cluster: the machine's Redis and PostgreSQL, worker processes started by the tests


@pytest.fixture(scope="module")
def broker_url():
    """A Redis database of its own (emptied before and after), on the machine's server."""
    db = random.randint(2, 15)
    client = redis.Redis.from_url(f"{REDIS}/{db}")
    client.flushdb()
    yield f"{REDIS}/{db}"
    client.flushdb()


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory, pg_server_url, broker_url, mobilenet_weights):
    home = tmp_path_factory.mktemp("cluster")
    torch_home = home / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(mobilenet_weights, torch_home / "hub" / "checkpoints")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALFAKE_")}
    env.update(
        REALFAKE_HOME=str(home),
        REALFAKE_DATABASE_URL=pg_server_url,
        REALFAKE_BROKER_URL=broker_url,
        REALFAKE_ARTIFACTS=str(home / "artifacts"),
        REALFAKE_HEARTBEAT_S="0.5",
        REALFAKE_LEASE_GRACE_S="4",
        REALFAKE_RESEND_AFTER_S="8",
        TORCH_HOME=str(torch_home),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    return env


@pytest.fixture
def cluster_factory(cluster_env):
    engine = make_engine(cluster_env["REALFAKE_DATABASE_URL"])
    migrate(engine)
    with engine.begin() as connection:
        empty_tables(connection)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def producer(cluster_env):
    app = make_app(Settings.from_env(cluster_env))
    yield app
    app.close()
