"""Alembic environment: the connection comes from ``genshop.db`` (``config.attributes["connection"]``)."""

from __future__ import annotations

from alembic import context

from genshop.store import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # `alembic -c ...` by hand: an engine from the configured URL
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()
