"""Schema migrations (Alembic): ``genshop db upgrade | current | history``, and the check at start.

The migrations live inside the package (``genshop/migrations``), so an installed genshop can
upgrade its database. ``Store`` runs ``ensure_schema`` when it opens a database, and ``genshop
serve`` and ``genshop worker`` open one before they start: a database behind the code is
upgraded there (``GENSHOP_DB_AUTO_UPGRADE``, default true) or, with ``GENSHOP_DB_AUTO_UPGRADE=false``,
refused with one line saying to run ``genshop db upgrade``. A database at a revision this code
does not know (a newer genshop migrated it) is always refused.

A database made before migrations (by ``create_all``: tables, no ``alembic_version``) is
stamped at the first revision, which is exactly that schema, and upgraded from there.

Processes that start together upgrade one at a time: PostgreSQL under a session advisory lock
(DDL is transactional there, so an upgrade is all or nothing), SQLite under a file lock beside
the database file. Each re-reads the revision once it holds the lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

SCRIPT_LOCATION = "genshop:migrations"
FIRST_REVISION = "0001"  # the schema create_all made before migrations
MIGRATION_LOCK_KEY = 1_701_000_019  # PostgreSQL advisory lock of schema upgrades


class SchemaError(RuntimeError):
    """The database's schema does not match this code's and will not be changed here."""


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    doc: str
    is_head: bool


def alembic_config(connection: Connection | None = None, url: str | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    return _script().get_current_head()


def history() -> list[Revision]:
    """Every revision, newest first."""
    heads = set(_script().get_heads())
    return [Revision(r.revision, r.down_revision if isinstance(r.down_revision, str) else None,
                     (r.doc or "").strip().splitlines()[0] if r.doc else "", r.revision in heads)
            for r in _script().walk_revisions()]


def _known(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several kinds for an unknown id
        return False


def current_revision(connection: Connection) -> str | None:
    """The database's revision: None when it has no schema at all, ``FIRST_REVISION`` for one
    made by ``create_all`` before migrations."""
    from alembic.runtime.migration import MigrationContext

    heads = MigrationContext.configure(connection).get_current_heads()
    if heads:
        return heads[0]
    return FIRST_REVISION if inspect(connection).has_table("briefs") else None


def database_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return current_revision(connection)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection held alone among the processes that migrate this database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
            try:
                yield connection
            finally:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                connection.commit()
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if database and database != ":memory:" and not database.startswith("file:"):
        with open(f"{database}.migrate-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with engine.connect() as connection:
                    yield connection
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    with engine.connect() as connection:
        yield connection


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the database to ``revision``; returns (revision before, revision after)."""
    return _migrate(engine, revision, downgrade=False)


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str]:
    """Downgrade the database to ``revision`` (``base``: no schema); returns (before, after)."""
    return _migrate(engine, revision, downgrade=True)


def _migrate(engine: Engine, revision: str, downgrade: bool) -> tuple[str | None, str]:
    from alembic import command

    with _migration_lock(engine) as connection:
        before = current_revision(connection)
        if before is not None and not _known(before):
            raise SchemaError(f"the database is at revision {before!r}, which this genshop does not know "
                              f"(its newest is {head_revision()!r}): upgrade genshop")
        connection.rollback()  # end the read's implicit transaction: the upgrade is one of its own
        config = alembic_config(connection)
        with connection.begin():
            if before == FIRST_REVISION and not _has_version_table(connection):
                _complete_first_revision(connection)
                command.stamp(config, FIRST_REVISION)  # made by create_all before migrations
            (command.downgrade if downgrade else command.upgrade)(config, revision)
        after = current_revision(connection)
        connection.rollback()
        return before, after


UNCHANGED_SINCE_FIRST = ("items", "scores", "catalog_products", "understandings", "experiments", "ab_results")


def _complete_first_revision(connection: Connection) -> None:
    """A database made by an older ``create_all`` may lack tables added later (before migrations):
    make those of revision 1 whose models have not changed since, so the stamp tells the truth."""
    from genshop.store import Base

    existing = set(inspect(connection).get_table_names())
    missing = [Base.metadata.tables[name] for name in UNCHANGED_SINCE_FIRST if name not in existing]
    if missing:
        Base.metadata.create_all(connection, tables=missing)


def _has_version_table(connection: Connection) -> bool:
    return inspect(connection).has_table("alembic_version")


def auto_upgrade_enabled() -> bool:
    value = os.environ.get("GENSHOP_DB_AUTO_UPGRADE", "true").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"GENSHOP_DB_AUTO_UPGRADE: {value!r} is not true or false")


def ensure_schema(engine: Engine, auto_upgrade: bool | None = None) -> None:
    """The database at this code's head revision: upgraded if behind (or refused, ``SchemaError``,
    when ``auto_upgrade`` is false), refused if at a revision this code does not know."""
    head = head_revision()
    current = database_revision(engine)
    if current == head and current is not None:
        with engine.connect() as connection:
            if _has_version_table(connection):
                return
    if current is not None and not _known(current):
        raise SchemaError(f"the database is at revision {current!r}, which this genshop does not know "
                          f"(its newest is {head!r}): upgrade genshop")
    if current is not None and not (auto_upgrade if auto_upgrade is not None else auto_upgrade_enabled()):
        raise SchemaError(f"the database is at revision {current!r}, this genshop needs {head!r}: "
                          f"run `genshop db upgrade` (GENSHOP_DB_AUTO_UPGRADE is false)")
    upgrade(engine)


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)

