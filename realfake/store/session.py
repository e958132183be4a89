"""Engines, the commit-or-rollback session helper, migrations and upserts."""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Update, create_engine, event, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from realfake.config import shown_url
from realfake.errors import SettingsError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
_URL_FORMS = "realfake takes sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout. A URL no engine
    can be made of raises SettingsError, naming it without its password."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SettingsError(f"REALFAKE_DATABASE_URL is not a database URL; {_URL_FORMS}") from None
    if parsed.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except (ArgumentError, ImportError) as error:  # an unknown dialect or a driver not installed
            raise SettingsError(f"REALFAKE_DATABASE_URL {shown_url(url)}: {error}; {_URL_FORMS}") from None
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


def database_cutoff(session: Session, seconds: float) -> datetime:
    """Now minus `seconds`, by the database's clock (workers' clocks may differ)."""
    return session.scalar(select(func.now())) - timedelta(seconds=seconds)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations of one SQLite file across processes, around the whole transaction."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to `revision` (idempotent, safe from several processes at once)."""
    with _sqlite_file_lock(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # held until this transaction commits
            connection.execute(text("SELECT pg_advisory_xact_lock(7301)"))
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def upsert(session: Session, model: type, rows: Sequence[dict], keys: Sequence[str]) -> None:
    """Insert `rows`, or update every non-key column where a row with the same `keys` exists."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"upsert is not implemented for {dialect}")
    statement = insert(model).values(list(rows))
    updates = {c: statement.excluded[c] for c in rows[0] if c not in keys}
    session.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=updates))


class LeaseHeartbeat(threading.Thread):
    """Runs `stamp`, an UPDATE of one lease's heartbeat, every `interval_s`; when it matches no
    row the lease was taken away: `lost` is set and the beating ends."""

    def __init__(self, factory: sessionmaker[Session], stamp: Update, interval_s: float, name: str):
        super().__init__(name=name, daemon=True)
        self.factory, self.stamp, self.interval_s = factory, stamp.execution_options(synchronize_session=False), interval_s
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                with session_scope(self.factory) as session:
                    beat = session.execute(self.stamp).rowcount
            except Exception:  # a database blip: try again at the next beat
                log.exception("%s failed", self.name)
                continue
            if not beat:
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
