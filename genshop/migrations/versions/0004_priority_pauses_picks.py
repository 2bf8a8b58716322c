"""briefs.priority, queue_pauses, picks: queue control and designers' picks as preference data

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

``briefs.priority`` (``normal``/``high``, also in the spec) lets a designer's place in the queue
be one count; ``queue_pauses`` holds the pauses in force (the whole queue, ``all``, or
``designer:<name>``); ``picks`` the gallery's picked/rejected marks per item, group and designer.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER (no batch copy of briefs, whose drop would cascade to items on SQLite)
    op.add_column("briefs", sa.Column("priority", sa.String(length=8), nullable=False, server_default="normal"))
    op.create_table(
        "queue_pauses",
        sa.Column("scope", sa.String(length=80), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope"),
    )
    op.create_table(
        "picks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.String(length=32), nullable=False),
        sa.Column("brief_id", sa.String(length=32), nullable=False),
        sa.Column("designer", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("choice", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["brief_id"], ["briefs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("item_id", "group_id", "designer", name="uq_pick_item_group_designer"),
    )
    op.create_index("ix_picks_item_id", "picks", ["item_id"], unique=False)
    op.create_index("ix_picks_brief_id", "picks", ["brief_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_picks_brief_id", table_name="picks")
    op.drop_index("ix_picks_item_id", table_name="picks")
    op.drop_table("picks")
    op.drop_table("queue_pauses")
    op.execute("UPDATE briefs SET status = 'queued' WHERE status = 'paused'")  # the older code has no pauses
    op.execute("ALTER TABLE briefs DROP COLUMN priority")  # SQLite >= 3.35 and PostgreSQL; no table copy
