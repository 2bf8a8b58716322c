"""brief_runs: one running delivery per brief (the lease and its heartbeat, follow-ups queued)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

The table the worker leases (branch i17-workers) added. A database that gained it from
``create_all`` before migrations keeps it as it is.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("brief_runs"):
        return
    op.create_table(
        "brief_runs",
        sa.Column("brief_id", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("followups_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["brief_id"], ["briefs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("brief_id"),
    )


def downgrade() -> None:
    op.drop_table("brief_runs")
