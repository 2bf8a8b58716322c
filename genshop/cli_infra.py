"""Click commands for a deployment's shared parts: ``genshop index serve`` and ``genshop db``."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("index")
def index_group() -> None:
    """The index owner: one process holding the vector indexes for every machine."""


@index_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8100, show_default=True)
@click.option("--dir", "index_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="index folder on this machine (default: GENSHOP_INDEX_DIR)")
def index_serve(host: str, port: int, index_dir: Path | None) -> None:
    """Serve the indexes in GENSHOP_INDEX_DIR over HTTP; every other process sets GENSHOP_INDEX_URL to it."""
    import faiss
    import uvicorn

    from genshop.settings import get_settings
    from genshop.understanding.remote import create_index_app

    import os

    faiss.omp_set_num_threads(int(os.environ.get("GENSHOP_INDEX_THREADS", "1")))  # single queries: one thread each
    folder = index_dir or get_settings().index_dir
    folder.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_index_app(folder), host=host, port=port, log_level="info")


@click.group("db")
def db_group() -> None:
    """The database schema (Alembic migrations shipped with genshop), on GENSHOP_DATABASE_URL."""


def _engine():
    from sqlalchemy import create_engine

    from genshop.settings import get_settings

    return create_engine(get_settings().database_url)


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="the revision to upgrade to")
def db_upgrade(revision: str) -> None:
    """Upgrade the database to the newest schema (a database made before migrations is stamped first)."""
    from genshop.db import describe_url, upgrade
    from genshop.settings import get_settings

    before, after = upgrade(_engine(), revision)
    where = describe_url(get_settings().database_url)
    click.echo(f"{where}: {before or 'empty'} -> {after}" if before != after else f"{where}: already at {after}")


@db_group.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Downgrade the database to REVISION (e.g. 0002; 'base' drops everything)."""
    from genshop.db import describe_url, downgrade
    from genshop.settings import get_settings

    before, after = downgrade(_engine(), revision)
    click.echo(f"{describe_url(get_settings().database_url)}: {before or 'empty'} -> {after or 'empty'}")


@db_group.command("current")
def db_current() -> None:
    """The database's revision, and whether it is the newest this genshop knows."""
    from genshop.db import database_revision, head_revision

    current, head = database_revision(_engine()), head_revision()
    state = "head" if current == head else ("empty" if current is None else f"behind {head}: run `genshop db upgrade`")
    click.echo(f"{current or '-'} ({state})")


@db_group.command("history")
def db_history() -> None:
    """Every revision, newest first."""
    from genshop.db import history

    for revision in history():
        click.echo(f"{revision.down_revision or '<base>'} -> {revision.revision}{' (head)' if revision.is_head else ''}: "
                   f"{revision.doc}")
