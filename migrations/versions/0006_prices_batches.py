"""usage_events: service tier, price provenance, audio and image tokens; batch_jobs

Revision ID: 0006
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TOKENS = ("audio_prompt_tokens", "audio_completion_tokens", "image_prompt_tokens", "image_completion_tokens")


def upgrade() -> None:
    # Nullable, or with a constant default: Postgres adds either without rewriting the table, and SQLite
    # with its own ALTER TABLE (a batch operation would copy the table, which a view over it forbids).
    for name in ("service_tier", "price_key", "price_version"):
        op.add_column("usage_events", sa.Column(name, sa.Text(), nullable=True))
    for name in _TOKENS:
        op.add_column(
            "usage_events", sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )
    op.create_table(
        "batch_jobs",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("api_key_id", sa.Text(), nullable=True),
        sa.Column("feature", sa.Text(), nullable=True),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("polls", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metering_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("metered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("metered_lines", sa.Integer(), nullable=True),
        sa.Column("truncated", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("upstream", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("batch_id", name="pk_batch_jobs"),
    )
    op.create_index("ix_batch_jobs_next_poll_at", "batch_jobs", ["next_poll_at"])


def downgrade() -> None:
    op.drop_table("batch_jobs")
    for name in ("service_tier", "price_key", "price_version", *_TOKENS):
        op.drop_column("usage_events", name)
