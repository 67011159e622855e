"""provider_usage_daily, provider_usage_days and the reconciliation_daily view

OpenAI's own usage and costs per day and model, beside the gateway's.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The gateway's side is summed from usage_events, not usage_daily: the rollup keys on the model the
# client asked for (an alias, say), while OpenAI reports the model that answered (`upstream_model`).
# Only the days OpenAI's numbers were read for are summed, each through the created_at index; a day
# filter on the view reaches both branches of the UNION ALL (a GROUP BY key), so a dashboard asking for
# a week reads a week of events. A call counts as a request when it carried tokens: OpenAI counts the
# model requests it served, not the 429s the gateway retried.
_GATEWAY_SIDE = """
    SELECT d.day,
           COALESCE(e.upstream_model, e.model, '') AS model,
           CASE WHEN e.total_tokens > 0 THEN 1 ELSE 0 END AS gateway_requests,
           e.prompt_tokens AS gateway_input_tokens,
           e.cached_tokens AS gateway_cached_tokens,
           e.completion_tokens AS gateway_output_tokens,
           COALESCE(e.cost_usd, 0) AS gateway_cost_usd,
           CASE WHEN e.cost_usd IS NULL AND e.total_tokens > 0 THEN 1 ELSE 0 END AS gateway_unpriced_requests,
           0 AS openai_requests, 0 AS openai_input_tokens, 0 AS openai_cached_tokens,
           0 AS openai_output_tokens, 0 AS openai_cost_usd
    FROM provider_usage_days d
    JOIN usage_events e ON e.created_at >= {day_start} AND e.created_at < {day_end}
"""

_VIEW = """
CREATE VIEW reconciliation_daily AS
SELECT day, model,
       SUM(gateway_requests) AS gateway_requests,
       SUM(openai_requests) AS openai_requests,
       SUM(openai_requests) - SUM(gateway_requests) AS requests_difference,
       SUM(gateway_input_tokens) AS gateway_input_tokens,
       SUM(openai_input_tokens) AS openai_input_tokens,
       SUM(openai_input_tokens) - SUM(gateway_input_tokens) AS input_tokens_difference,
       SUM(gateway_cached_tokens) AS gateway_cached_tokens,
       SUM(openai_cached_tokens) AS openai_cached_tokens,
       SUM(gateway_output_tokens) AS gateway_output_tokens,
       SUM(openai_output_tokens) AS openai_output_tokens,
       SUM(openai_output_tokens) - SUM(gateway_output_tokens) AS output_tokens_difference,
       SUM(gateway_cost_usd) AS gateway_cost_usd,
       SUM(openai_cost_usd) AS openai_cost_usd,
       SUM(openai_cost_usd) - SUM(gateway_cost_usd) AS cost_difference_usd,
       (SUM(openai_cost_usd) - SUM(gateway_cost_usd)) / NULLIF(SUM(openai_cost_usd), 0)
           AS cost_relative_difference,
       SUM(gateway_unpriced_requests) AS gateway_unpriced_requests
FROM (
    SELECT day, model,
           0 AS gateway_requests, 0 AS gateway_input_tokens, 0 AS gateway_cached_tokens,
           0 AS gateway_output_tokens, 0 AS gateway_cost_usd, 0 AS gateway_unpriced_requests,
           requests AS openai_requests, input_tokens AS openai_input_tokens,
           cached_tokens AS openai_cached_tokens, output_tokens AS openai_output_tokens,
           cost_usd AS openai_cost_usd
    FROM provider_usage_daily
    UNION ALL
    {gateway}
) AS both_sides
GROUP BY day, model
"""

# Days are UTC, as in usage_daily: a date compared with a timestamptz would be read in the session's
# time zone.
_DAY_BOUNDS = {
    "postgresql": ("(d.day::timestamp AT TIME ZONE 'UTC')", "((d.day + 1)::timestamp AT TIME ZONE 'UTC')"),
    # SQLite keeps created_at as UTC text ('YYYY-MM-DD HH:MM:SS...'), which sorts as time does.
    "sqlite": ("d.day", "date(d.day, '+1 day')"),
}


def upgrade() -> None:
    op.create_table(
        "provider_usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        # `completions`, `embeddings` (the Usage API) or `costs` (the Costs API).
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        # The Costs API's line item ('gpt-4o-mini-2024-07-18, input'); '' on usage rows.
        sa.Column("line_item", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cost_usd", sa.Numeric(20, 10), server_default=sa.text("0"), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("day", "source", "model", "line_item", name="pk_provider_usage_daily"),
    )
    op.create_table(
        "provider_usage_days",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        # The day had ended when it was read; OpenAI may still revise it for a while after.
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("day", name="pk_provider_usage_days"),
    )
    # A view pins the columns it reads: a later migration that changes the type of one of them (Postgres)
    # or recreates usage_events in batch mode (SQLite, e.g. to drop a column) must drop the view first and
    # create it again after. Adding columns needs neither.
    start, end = _DAY_BOUNDS[op.get_bind().dialect.name]
    op.execute(_VIEW.format(gateway=_GATEWAY_SIDE.format(day_start=start, day_end=end)))


def downgrade() -> None:
    op.execute("DROP VIEW reconciliation_daily")
    op.drop_table("provider_usage_days")
    op.drop_table("provider_usage_daily")
