"""Schema migrations (Alembic) on SQLite and on the PostgreSQL that runs here: the first revision is
the schema ``create_all`` made before, an old database upgrades keeping its rows, the head equals
the models, and ``serve``/``worker`` refuse a database behind the code when told not to upgrade."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, inspect, text

from genshop import db
from genshop.store import Base, Store
from tests.conftest import invoke_cli
from tests.test_store_and_generation import postgres_url  # noqa: F401 - fixture


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'genshop.db'}"
    return request.getfixturevalue("postgres_url")


def pre_migration_database(url: str) -> None:
    """A database as ``create_all`` made it before migrations (revision 1, no alembic_version),
    with a brief alice submitted through the API and one from the CLI."""
    engine = create_engine(url)
    db.upgrade(engine, db.FIRST_REVISION)
    now = datetime.now(timezone.utc)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
        for brief_id in ("a" * 32, "c" * 32):
            connection.execute(text(
                "INSERT INTO briefs (id, title, spec, preset, status, progress, attempts, cancel_requested, "
                "created_at, updated_at) VALUES (:id, 'Red kurta', :spec, 'tiny-random', 'queued', '{}', 0, false, "
                ":now, :now)"), {"id": brief_id, "spec": '{"title": "Red kurta"}', "now": now})
        connection.execute(text("INSERT INTO brief_designers (brief_id, designer) VALUES (:id, 'alice')"),
                           {"id": "a" * 32})
    engine.dispose()


def schema_differences(engine) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_a_new_database_is_made_by_the_migrations_and_equals_the_models(database_url, tmp_path):
    store = Store(database_url, tmp_path / "home")
    assert db.database_revision(store.engine) == db.head_revision()
    assert schema_differences(store.engine) == []
    assert "brief_designers" not in inspect(store.engine).get_table_names()
    store.engine.dispose()


def test_a_database_from_before_migrations_upgrades_and_keeps_its_owners(database_url, tmp_path):
    pre_migration_database(database_url)
    engine = create_engine(database_url)
    assert db.database_revision(engine) == db.FIRST_REVISION
    with pytest.raises(db.SchemaError, match="run `genshop db upgrade`"):
        Store(database_url, tmp_path / "home", auto_upgrade=False)
    store = Store(database_url, tmp_path / "home")
    assert db.database_revision(engine) == db.head_revision() and schema_differences(engine) == []
    assert store.designer_of("a" * 32) == "alice" and store.designer_of("c" * 32) is None
    assert [b.id for b in store.list_briefs(designer="alice")] == ["a" * 32]
    assert store.get_brief("a" * 32, designer="alice").title == "Red kurta"
    db.downgrade(engine, "0002")  # and back down: the owners go back to their table
    with engine.connect() as connection:
        assert connection.execute(text("SELECT brief_id, designer FROM brief_designers")).all() == [("a" * 32, "alice")]
    db.upgrade(engine)
    assert store.designer_of("a" * 32) == "alice"
    store.engine.dispose()
    engine.dispose()


def test_processes_starting_together_upgrade_once(postgres_url, tmp_path):  # noqa: F811
    errors, barrier = [], threading.Barrier(4)

    def open_store():
        barrier.wait()
        try:
            Store(postgres_url, tmp_path / "home").engine.dispose()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert db.database_revision(create_engine(postgres_url)) == db.head_revision()


def test_db_commands_and_the_refusal_at_start(tmp_path, models_dir):
    from tests.conftest import make_env

    url = f"sqlite:///{tmp_path / 'genshop.db'}"
    env = make_env(tmp_path / "home", models_dir, GENSHOP_DATABASE_URL=url, GENSHOP_API_TOKENS="alice:secret-token")
    pre_migration_database(url)
    history = invoke_cli(["db", "history"], env)
    head = db.history()[0]
    assert history.returncode == 0 and history.stdout.splitlines()[0].startswith(
        f"{head.down_revision} -> {head.revision} (head)")
    assert "<base> -> 0001" in history.stdout
    assert invoke_cli(["db", "current"], env).stdout.strip() == f"0001 (behind {db.head_revision()}: run `genshop db upgrade`)"
    refused = {**env, "GENSHOP_DB_AUTO_UPGRADE": "false"}
    for command in (["worker"], ["serve", "--port", "1"]):
        result = invoke_cli(command, refused)
        assert result.returncode == 1, result.stdout
        assert "this genshop needs" in result.stderr and "run `genshop db upgrade`" in result.stderr
    upgraded = invoke_cli(["db", "upgrade"], env)
    assert upgraded.returncode == 0 and f"0001 -> {db.head_revision()}" in upgraded.stdout
    assert invoke_cli(["db", "current"], env).stdout.strip() == f"{db.head_revision()} (head)"
    assert "already at" in invoke_cli(["db", "upgrade"], env).stdout


def test_a_database_older_than_the_api_and_the_catalog_upgrades_too(tmp_path):
    """Made by a create_all that had neither brief_designers nor the catalog and experiment tables."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    pre_migration_database(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in ("brief_designers", "ab_results", "experiments", "understandings", "catalog_products"):
            connection.execute(text(f"DROP TABLE {table}"))
    store = Store(url, tmp_path / "home")
    assert db.database_revision(engine) == db.head_revision() and schema_differences(engine) == []
    assert store.designer_of("a" * 32) is None and store.list_catalog_products() == []
    engine.dispose()
    store.engine.dispose()
