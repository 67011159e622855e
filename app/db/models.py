"""The usage tables, as SQLAlchemy Core sees them (the migrations in migrations/versions create them).

`usage_daily` is a rollup table kept in step with `usage_events` by the recorder, in the same
transaction as the event inserts. Not a view: at hundreds of millions of events a view is a GROUP BY
over the whole range on every dashboard refresh, while the rollup is a few thousand rows a month.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """timestamptz on Postgres; on SQLite, which stores no offset, values are written in UTC and read
    back as aware UTC datetimes, so callers see the same type on both."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# SQLite only auto-assigns ids to a column declared exactly INTEGER PRIMARY KEY (a rowid alias).
_BIGINT_ID = BigInteger().with_variant(Integer(), "sqlite")
_MONEY = Numeric(20, 10)

usage_events = Table(
    "usage_events",
    metadata,
    Column("id", _BIGINT_ID, Identity()),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("request_id", Text, nullable=False),
    Column("api_key_id", Text),
    Column("feature", Text),
    Column("user_id", Text),
    Column("endpoint", Text, nullable=False),
    Column("model", Text),
    Column("upstream_model", Text),
    Column("stream", Boolean, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("attempts", SmallInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("completion_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("total_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("cached_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("reasoning_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("usage_source", Text, nullable=False),
    Column("cost_usd", _MONEY),
    Column("latency_ms", Integer, nullable=False),
    Column("ttfb_ms", Integer),
    Column("error_type", Text),
    Column("prompt_truncated", Boolean, nullable=False, server_default=text("false")),
    # The caller's X-Request-Id when it sent one; request_id is the gateway's own and unique.
    Column("client_request_id", Text),
    # What the budgets held for the call before it was made (NULL: no budget was asked).
    Column("reserved_usd", _MONEY),
    # Pricing provenance (migration 0006): the tier priced at, the price entry and its version.
    Column("service_tier", Text),
    Column("price_key", Text),
    Column("price_version", Text),
    Column("audio_prompt_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("audio_completion_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("image_prompt_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("image_completion_tokens", BigInteger, nullable=False, server_default=text("0")),
    # The browser token the call was made with; api_key_id is the key that minted it.
    Column("browser_token_id", Text),
    PrimaryKeyConstraint("id", name="pk_usage_events"),
    # The recorder's idempotence rests on this: a replayed event (its created_at fixed when it was made)
    # conflicts and is skipped. created_at is in it because on Postgres the table is partitioned by month
    # (migration 0011), and a unique key of a partitioned table must hold the partition key; so is the
    # primary key there, (id, created_at).
    UniqueConstraint("request_id", "created_at", name="uq_usage_events_request_id_created_at"),
    Index("ix_usage_events_created_at", "created_at"),
    Index("ix_usage_events_feature_created_at", "feature", "created_at"),
    Index("ix_usage_events_user_id_created_at", "user_id", "created_at"),
    Index("ix_usage_events_api_key_id_created_at", "api_key_id", "created_at"),
)

# Key columns hold '' rather than NULL: NULLs never conflict in a unique key, so the upsert would insert
# a fresh row for every batch instead of adding to the existing one.
usage_daily = Table(
    "usage_daily",
    metadata,
    Column("day", Date, nullable=False),
    Column("feature", Text, nullable=False, server_default=text("''")),
    Column("user_id", Text, nullable=False, server_default=text("''")),
    Column("model", Text, nullable=False, server_default=text("''")),
    Column("requests", BigInteger, nullable=False, server_default=text("0")),
    Column("prompt_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("completion_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("total_tokens", BigInteger, nullable=False, server_default=text("0")),
    # Calls without a known price count as 0 here, unlike SUM(usage_events.cost_usd) which skips them.
    Column("cost_usd", _MONEY, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("day", "feature", "user_id", "model", name="pk_usage_daily"),
)

# Gateway keys. The secret is never stored: only its SHA-256 (keys are 256-bit random, so a slow password
# hash would add latency without adding safety) and a short prefix for people to recognise it by.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("owner", Text),
    Column("prefix", Text, nullable=False),
    Column("secret_hash", Text, nullable=False),
    Column("default_feature", Text),
    Column("pin_feature", Boolean, nullable=False, server_default=text("false")),
    Column("allowed_models", JSON),
    Column("scopes", JSON),
    Column("rpm_limit", Integer),
    Column("tpm_limit", Integer),
    Column("budget_daily_usd", _MONEY),
    Column("budget_monthly_usd", _MONEY),
    Column("expires_at", UtcDateTime()),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("revoked_at", UtcDateTime()),
    PrimaryKeyConstraint("id", name="pk_api_keys"),
    UniqueConstraint("secret_hash", name="uq_api_keys_secret_hash"),
)

# Who created each object the upstream keeps (files, batches, vector stores, stored responses, …) through a
# gateway key: another key may not see or touch it. Objects with no row (made before the gateway, or by
# the master key) belong to the master key alone. Rows are never updated: an upstream id is never reused.
resource_owners = Table(
    "resource_owners",
    metadata,
    Column("resource_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("api_key_id", Text, nullable=False),
    Column("feature", Text),
    Column("created_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("resource_id", name="pk_resource_owners"),
    Index("ix_resource_owners_api_key_id_kind", "api_key_id", "kind"),
)

# Batches created through the gateway: who pays for them, and whether their lines have been metered.
# The poller claims a row by moving next_poll_at forward (compare-and-set), and the metering of its output
# by taking the lease (metering_until); each line's row is keyed by batch id + custom_id, so whichever
# process or replica gets there, a line is counted once.
batch_jobs = Table(
    "batch_jobs",
    metadata,
    Column("batch_id", Text, nullable=False),
    Column("api_key_id", Text),
    Column("feature", Text),
    Column("user_id", Text),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("status", Text, nullable=False),
    Column("polls", Integer, nullable=False, server_default=text("0")),
    Column("next_poll_at", UtcDateTime(), nullable=False),
    Column("metering_until", UtcDateTime()),
    Column("metered_at", UtcDateTime()),
    Column("metered_lines", Integer),
    # The output or error file was larger than the gateway reads: lines past the cap are not metered.
    Column("truncated", Boolean, nullable=False, server_default=text("false")),
    # The base URL of the upstream it was created at: only a gateway sending there can poll it (one
    # pointed elsewhere would be told 404 and close it unmetered).
    Column("upstream", Text),
    PrimaryKeyConstraint("batch_id", name="pk_batch_jobs"),
    Index("ix_batch_jobs_next_poll_at", "next_poll_at"),
)

# OpenAI's own numbers, read from its organization Usage API (`source` completions, embeddings: requests
# and tokens) and Costs API (`source` costs: USD per line item), per UTC day and model. A run replaces the
# days it read, so reading a day again never counts it twice.
provider_usage_daily = Table(
    "provider_usage_daily",
    metadata,
    Column("day", Date, nullable=False),
    Column("source", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("line_item", Text, nullable=False, server_default=text("''")),
    Column("requests", BigInteger, nullable=False, server_default=text("0")),
    Column("input_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("cached_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("output_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("cost_usd", _MONEY, nullable=False, server_default=text("0")),
    Column("fetched_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("day", "source", "model", "line_item", name="pk_provider_usage_daily"),
)

# The days OpenAI's numbers were read for, even those it reported nothing on: the reconciliation_daily
# view compares only these days, so a day the gateway metered and OpenAI billed nothing still shows.
provider_usage_days = Table(
    "provider_usage_days",
    metadata,
    Column("day", Date, nullable=False),
    Column("fetched_at", UtcDateTime(), nullable=False),
    Column("complete", Boolean, nullable=False),
    PrimaryKeyConstraint("day", name="pk_provider_usage_days"),
)
