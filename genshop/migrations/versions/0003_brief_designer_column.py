"""briefs.designer: who submitted a brief through the API, a column of briefs (was the brief_designers table)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``brief_designers`` was a table of its own only so that databases made before the API
gained it from ``create_all`` without a migration. With migrations, the owner is a
nullable, indexed column of ``briefs`` (NULL: submitted from the CLI); the rows are copied.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTERs, no batch copy of briefs: on SQLite a copy drops the old table, and with
    # foreign keys on that would cascade to its items.
    op.add_column("briefs", sa.Column("designer", sa.String(length=64), nullable=True))
    op.create_index("ix_briefs_designer", "briefs", ["designer"], unique=False)
    if not sa.inspect(op.get_bind()).has_table("brief_designers"):  # last opened by a genshop older than the API
        return
    op.execute("UPDATE briefs SET designer = (SELECT d.designer FROM brief_designers d WHERE d.brief_id = briefs.id)")
    op.drop_index("ix_brief_designers_designer", table_name="brief_designers")
    op.drop_table("brief_designers")


def downgrade() -> None:
    op.create_table(
        "brief_designers",
        sa.Column("brief_id", sa.String(length=32), nullable=False),
        sa.Column("designer", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["brief_id"], ["briefs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("brief_id"),
    )
    op.create_index("ix_brief_designers_designer", "brief_designers", ["designer"], unique=False)
    op.execute("INSERT INTO brief_designers (brief_id, designer) SELECT id, designer FROM briefs "
               "WHERE designer IS NOT NULL")
    op.drop_index("ix_briefs_designer", table_name="briefs")
    op.execute("ALTER TABLE briefs DROP COLUMN designer")  # SQLite >= 3.35 and PostgreSQL; no table copy
