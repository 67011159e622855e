"""usage_events.browser_token_id: the browser token a call was made with

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: adding it rewrites nothing, whatever the table's size. No index: a
    # token's calls are found by its user and key, which are indexed.
    with op.batch_alter_table("usage_events") as batch:
        batch.add_column(sa.Column("browser_token_id", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_events") as batch:
        batch.drop_column("browser_token_id")
