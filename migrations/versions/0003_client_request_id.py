"""usage_events.client_request_id: the caller's X-Request-Id, apart from the unique request_id

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: adding it rewrites nothing, whatever the table's size. No index: it is
    # for finding a caller's own call, not for dashboards.
    with op.batch_alter_table("usage_events") as batch:
        batch.add_column(sa.Column("client_request_id", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_events") as batch:
        batch.drop_column("client_request_id")
