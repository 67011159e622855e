"""Every setting the gateway reads, validated once at start-up.

The names without the GATEWAY_ prefix (OPENAI_API_KEY, OPENAI_BASE_URL, DATABASE_URL) are the ones
the OpenAI SDKs and most deployments already use, so they are read as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.exc import ArgumentError

from app.db.engine import async_url

DEFAULT_UPSTREAM = "https://api.openai.com/v1"
_OPENAI_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class DatabaseSettings(BaseSettings):
    """What the commands that only touch the database (`migrate`, `usage`) need."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", extra="ignore", frozen=True, populate_by_name=True
    )

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    # Where the embedded SQLite database and the usage spool live.
    data_dir: Path = Path("./var")

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    # Dashboards: the password of the read-only role `migrate --create-readonly-role NAME` creates.
    readonly_role_password: SecretStr | None = Field(
        default=None, validation_alias="GATEWAY_READONLY_ROLE_PASSWORD"
    )

    @field_validator("database_url")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        # Read now, so that a URL the gateway cannot use stops it with one line rather than a traceback
        # from the first worker's start-up. (Whether the database answers is for /readyz.)
        try:
            async_url(value, Path("."))
        except ArgumentError:
            raise ValueError("not a database URL (e.g. postgresql://user:password@host:5432/db)") from None
        return value


class Settings(DatabaseSettings):
    # The external contract: names users' code and deployments depend on (README, Configuration).
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str = Field(default=DEFAULT_UPSTREAM, validation_alias="OPENAI_BASE_URL")
    master_key: SecretStr = Field(validation_alias="GATEWAY_MASTER_KEY", min_length=8)
    redis_url: str | None = Field(default=None, validation_alias="GATEWAY_REDIS_URL")
    config_file: Path | None = Field(default=None, validation_alias="GATEWAY_CONFIG")

    # Usage metering: the recorder's queue and batches.
    metering: bool = True
    recorder_max_queue: int = Field(default=100_000, ge=100)
    recorder_batch_size: int = Field(default=2000, ge=1)
    recorder_flush_interval_s: float = Field(default=0.2, gt=0, le=10)

    # Retry policy for upstream calls.
    max_attempts: int = Field(default=3, ge=1, le=20)
    # The whole upstream call, first attempt included (a non-streamed answer must arrive within it; a
    # stream's first bytes). As long as the OpenAI SDKs' own default timeout: a later answer would reach
    # no SDK client waiting with its defaults.
    retry_deadline_s: float = Field(default=600.0, gt=0)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    retry_after_max_s: float = Field(default=30.0, ge=0)
    # Answer `x-should-retry: false` once the gateway has spent its own retries, so the SDK's retries
    # do not multiply the gateway's.
    suppress_client_retries: bool = True

    # Timeouts.
    connect_timeout_s: float = Field(default=5.0, gt=0)
    stream_read_timeout_s: float = Field(default=120.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)

    # Limits.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # Passthrough uploads (files, audio) are streamed, never held in memory; OpenAI takes files to 512 MB.
    max_upload_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    upstream_max_connections: int = Field(default=2048, ge=1)
    # The longest SSE event relayed (a longer one ends the stream with an error): each stream holds at
    # most this much of an event still arriving. OpenAI's largest are final Responses API events carrying
    # the whole output (a few MB with images); 32 MiB leaves room and bounds a hostile upstream.
    max_event_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # A request's head (request line and header fields): its size, and the time it may take to arrive.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    header_timeout_s: float = Field(default=10.0, gt=0)
    # A request body that sends nothing for this long before its end is answered 408 (nginx's
    # client_body_timeout has the same meaning and default).
    body_timeout_s: float = Field(default=60.0, gt=0)
    # An upstream answer read whole (a JSON body, an error) beyond this is refused (502), never buffered;
    # decompressed bytes count. Streams and downloads are relayed as they come and not bounded by it.
    max_answer_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    # /metrics: when set, a scrape needs `Authorization: Bearer <this key>` (the master key works too).
    metrics_key: SecretStr | None = Field(default=None, min_length=8)
    # Features that get a label of their own in /metrics besides those named in GATEWAY_CONFIG: the first
    # this many seen. The rest are counted under `other`, so clients' X-Feature values cannot grow a scrape.
    metrics_max_features: int = Field(default=100, ge=0)

    # Process.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=256)
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    # With several workers, how long one may take to answer its supervisor's health ping before it is
    # killed and restarted. uvicorn's own 5 s killed workers that were only slow on a starved machine,
    # over and over, each restart dropping its calls in flight.
    worker_healthcheck_timeout_s: int = Field(default=30, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Batch metering: batches created through the gateway are polled (backoff from the first to the
    # longest interval) until they end, then their output and error files are read (at most this many
    # bytes each) and each line metered. The lease keeps two replicas from reading the same batch at once.
    batch_metering: bool = True
    batch_poll_initial_s: float = Field(default=30.0, gt=0)
    batch_poll_max_s: float = Field(default=1800.0, gt=0)
    batch_lease_s: float = Field(default=300.0, gt=0)
    batch_max_file_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)

    # Browsers: CORS, browser tokens, SSE keep-alives.
    # Origins whose pages may call /v1/* (comma-separated `scheme://host[:port]`, or `*` alone for any);
    # empty: no CORS headers at all. The gateway uses no cookies and never allows credentials.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), validation_alias="GATEWAY_CORS_ORIGINS"
    )
    # Signs browser tokens; unset: derived from the master key (tokens then die when it changes). Every
    # worker and replica must share it.
    browser_token_secret: SecretStr | None = Field(default=None, min_length=32)
    # An SSE comment every this many seconds while a stream waits (for the upstream's first byte, or
    # between events), so proxies do not cut it as idle; 0 turns it off.
    sse_keepalive_s: float = Field(default=15.0, ge=0, le=3600)

    # Reconciliation with OpenAI's own usage and costs (its organization Usage and Costs APIs). The admin
    # key (sk-admin-…) is sent only to OPENAI_BASE_URL's /organization/ endpoints; unset, the background
    # job is off. The id lists (comma-separated) narrow OpenAI's numbers to the projects or API keys the
    # gateway calls with, so traffic that bypassed the gateway is left out.
    openai_admin_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_ADMIN_KEY")
    reconcile_project_ids: str = ""
    reconcile_api_key_ids: str = ""
    reconcile_interval_s: float = Field(default=3600.0, gt=0)
    # OpenAI fills in and revises the last days for a while: each run of the job reads these days again.
    reconcile_days: int = Field(default=3, ge=1, le=31)
    reconcile_timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("openai_admin_key", mode="before")
    @classmethod
    def _blank_admin_key(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("reconcile_project_ids", "reconcile_api_key_ids")
    @classmethod
    def _id_list(cls, value: str) -> str:
        ids = [part.strip() for part in value.split(",") if part.strip()]
        if len(ids) > 100 or any(not _OPENAI_ID.fullmatch(part) for part in ids):
            raise ValueError("must be up to 100 comma-separated ids of A-Za-z0-9_- (1-128 characters)")
        return ",".join(ids)

    # Budgets: how long a call's reservation holds its worst-case cost when nothing settles it (its
    # process died). Past the request timeout, with room for retries and fallbacks; a longer call is
    # still charged when it ends, its hold just lapses before.
    budget_reservation_ttl_s: float = Field(default=1200.0, gt=0)

    # Scale-out: replicas sharing one Redis share its counters under this key prefix; deployments (or
    # test runs) sharing one Redis keep theirs apart with prefixes of their own.
    redis_key_prefix: str = Field(default="gw:", min_length=1, max_length=64)
    # Scale-out: whole months of usage_events older than this many days are dropped (usage_daily keeps
    # their sums); None keeps every event.
    usage_retention_days: int | None = Field(default=None, ge=1)

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        origins = tuple(part.strip().rstrip("/").lower() for part in value.split(",") if part.strip())
        if "*" in origins and len(origins) > 1:
            raise ValueError("'*' stands for every origin and must be alone")
        for origin in origins:
            if origin != "*" and not is_origin(origin):
                raise ValueError(f"'{origin}' is not an origin (scheme://host[:port], nothing after it)")
        return origins

    @field_validator(
        "openai_api_key", "redis_url", "config_file", "metrics_key", "browser_token_secret", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _backoff_order(self) -> Settings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("GATEWAY_BACKOFF_MAX_S must be >= GATEWAY_BACKOFF_INITIAL_S")
        return self

    @property
    def upstream_configured(self) -> bool:
        # A self-hosted OpenAI-compatible server often needs no key; OpenAI itself always does.
        return self.openai_api_key is not None or self.openai_base_url != DEFAULT_UPSTREAM

    # Tracing (OpenTelemetry, app/tracing.py): spans go to this OTLP/HTTP collector when set; off when unset.
    otel_endpoint: str | None = Field(default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")

    @field_validator("otel_endpoint", mode="before")
    @classmethod
    def _otel_endpoint(cls, value: object) -> object:
        if value == "" or value is None:
            return None
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (OTLP over HTTP)")
        return value


def is_origin(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and f"{parts.scheme}://{parts.netloc}" == value
        and "@" not in parts.netloc
    )


_S = TypeVar("_S", bound=DatabaseSettings)


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line meant for the operator."""


def _env_name(loc: tuple[int | str, ...]) -> str:
    # Errors on aliased fields are located by their env name already; the others by field name.
    name = str(loc[0]) if loc else ""
    if name in Settings.model_fields and not Settings.model_fields[name].validation_alias:
        return f"GATEWAY_{name.upper()}"
    return name or "settings"


def load_settings() -> Settings:
    return _load(Settings)


def load_database_settings() -> DatabaseSettings:
    return _load(DatabaseSettings)


def _load(kind: type[_S]) -> _S:
    try:
        return kind()
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"invalid configuration: {_env_name(err['loc'])}: {err['msg']}") from None
