"""`llm-gateway serve | ...`: the console entry point."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import uvicorn
from pydantic import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.exc import DBAPIError

from app.access.endpoint_classes import DEFAULT_SCOPES
from app.access.keys import KeyStore, public
from app.call.who import ApiKey
from app.config import ConfigError, DatabaseSettings, Settings, load_database_settings, load_settings
from app.config_file import Caps, GatewayConfig
from app.db.engine import create_engine, display_url
from app.db.migrate import BEHIND, SCHEMA_SQLSTATES, upgrade_reporting
from app.db.models import api_keys
from app.db.partitions import prune
from app.db.readonly_role import PASSWORD_ENV, REPORTING_TABLES, create_readonly_role
from app.errors import GatewayError
from app.live_config import load_gateway_config
from app.logs import configure_logging
from app.metering.metrics import WORKER_METRICS_DIR
from app.metering.pricing import TIERS, PriceTable, Rates
from app.metering.repricing import DayDelta, reprice, unpriced
from app.money import usd
from app.proxy.upstream import UpstreamClient
from app.reconcile import store as reconciliation
from app.reconcile.job import organization_reader, reconcile
from app.reconcile.provider import MAX_DAYS, ProviderError
from app.reports.usage import (
    DEFAULT_GROUP_BY,
    UsageQuery,
    default_range,
    parse_group_by,
    parse_since,
    to_csv,
    to_plain_table,
    to_table,
    usage_report,
)
from app.routes.admin import KeyCreate, KeyUpdate

log = logging.getLogger("gateway")


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    config = load_gateway_config(settings.config_file)
    configure_logging(settings.log_level)
    workers = args.workers or settings.workers
    if workers > 1:
        _share_worker_metrics()
    if workers > 1 and not settings.redis_url:
        _warn_unshared_limits(workers, config, settings)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        workers=workers,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=_http_protocol(settings),
        # h11 (where httptools is not installed) bounds its head itself, though not the time it takes.
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        timeout_worker_healthcheck=settings.worker_healthcheck_timeout_s,
        log_config=None,
        access_log=False,
        server_header=False,
        # Nothing reads the client's address, so X-Forwarded-For need not be parsed on every request.
        proxy_headers=False,
    )
    return 0


def _share_worker_metrics() -> None:
    """The workers publish their metrics here, so that a scrape of any of them answers for all of them
    (app/metering/metrics.py). Made fresh for this server, removed when it exits (the workers are spawned,
    not forked: the exit handler is the server's alone)."""
    directory = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    os.environ[WORKER_METRICS_DIR] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


def _warn_unshared_limits(workers: int, config: GatewayConfig, settings: Settings) -> None:
    """Without Redis each worker process counts limits and budgets on its own, so together they admit up
    to `workers` times what a limit says. Legitimate on one worker, or with no limits at all; otherwise
    said once, here, before the workers start."""
    limited = [f"feature '{name}'" for name, caps in config.features.items() if _capped(caps)]
    if _capped(config.users):
        limited.append("every end user")
    keys = asyncio.run(_capped_keys(settings))
    if keys:
        limited.append(f"{keys} gateway key(s)")
    if limited:
        log.warning(
            "%d workers without GATEWAY_REDIS_URL: each worker counts rate limits and budgets on its own, "
            "so together they admit up to %d times a limit (limits are set for %s). Set GATEWAY_REDIS_URL "
            "to share the counters.",
            workers,
            workers,
            ", ".join(limited),
        )


def _capped(caps: Caps) -> bool:
    return any(
        value is not None for value in (caps.rpm, caps.tpm, caps.budget_daily_usd, caps.budget_monthly_usd)
    )


async def _capped_keys(settings: Settings) -> int:
    """Usable keys with a limit or a budget of their own; 0 when the database cannot say (the gateway
    starts anyway, and /readyz tells why)."""
    engine = create_engine(settings.database_url, settings.data_dir)
    capped = or_(*(api_keys.c[name].is_not(None) for name in _KEY_CAPS))
    statement = select(func.count()).where(api_keys.c.revoked_at.is_(None), capped)
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            return int((await conn.execute(statement)).scalar_one())
    except Exception:  # any failure: the warning is a courtesy, never a reason not to start
        return 0
    finally:
        await engine.dispose()


_KEY_CAPS = ("rpm_limit", "tpm_limit", "budget_daily_usd", "budget_monthly_usd")


def _http_protocol(settings: Settings) -> type[asyncio.Protocol] | str:
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    from app.edge.http_head import head_limited_protocol

    return head_limited_protocol(settings)


def _migrate(args: argparse.Namespace) -> int:
    settings = load_database_settings()
    where = display_url(settings.database_url, settings.data_dir)
    applied = upgrade_reporting(settings.database_url, settings.data_dir)
    if applied:
        print(f"llm-gateway migrate: applied {len(applied)} migration(s) to {where}:")
        for revision in applied:
            print(f"  {revision}")
    else:
        print(f"llm-gateway migrate: {where} is at the latest schema already; nothing to apply")
    if args.create_readonly_role:
        return _readonly_role(settings, args.create_readonly_role)
    return 0


def _readonly_role(settings: DatabaseSettings, name: str) -> int:
    password = settings.readonly_role_password

    async def run() -> None:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            await create_readonly_role(engine, name, password.get_secret_value() if password else "")
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except ValueError as exc:
        print(f"llm-gateway migrate: {exc}", file=sys.stderr)
        return 2
    print(f"llm-gateway: role {name} can read {', '.join(REPORTING_TABLES)} and nothing else")
    return 0


def _usage(args: argparse.Namespace) -> int:
    settings = load_database_settings()
    first, tomorrow = default_range()
    try:
        groups = parse_group_by(args.by)
        start = parse_since(args.since) if args.since else first
        end = parse_since(args.until) if args.until else tomorrow
    except ValueError as exc:
        print(f"llm-gateway usage: {exc}", file=sys.stderr)
        return 2
    filters = {name: value for name in ("feature", "user", "model") if (value := getattr(args, name))}

    async def report() -> list[dict[str, object]]:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            query = UsageQuery(start, end, groups, filters)
            return await usage_report(engine, query)
        finally:
            await engine.dispose()

    rows = asyncio.run(report())
    if args.format == "csv":
        sys.stdout.write(to_csv(rows, groups))
    elif args.format == "json":
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
    else:
        print(to_table(rows, groups))
    return 0


def _prune(args: argparse.Namespace) -> int:
    settings = load_database_settings()
    try:
        before = date.fromisoformat(args.before)
    except ValueError:
        print(f"llm-gateway usage prune: --before {args.before!r} is not YYYY-MM-DD", file=sys.stderr)
        return 2
    if before > datetime.now(UTC).date():
        # The months being written now are never dropped by hand.
        print(f"llm-gateway usage prune: --before {before} is in the future", file=sys.stderr)
        return 2

    async def run() -> list[str]:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(prune, before)
        finally:
            await engine.dispose()

    dropped = asyncio.run(run())
    first_kept = before.replace(day=1).isoformat()
    print(f"dropped usage events before {first_kept}: {', '.join(dropped) or 'none'} (usage_daily kept)")
    return 0


def _keys(args: argparse.Namespace) -> int:
    settings = load_database_settings()

    async def run() -> int:
        engine = create_engine(settings.database_url, settings.data_dir)
        store = KeyStore(engine)
        try:
            if args.keys_command == "create":
                given = {k: v for k, v in vars(args).items() if k in KeyCreate.model_fields and v is not None}
                spec = KeyCreate.model_validate(given)
                key, secret = await store.create(spec.model_dump())
                print(f"created {key.id} ({key.name}), scopes: {_scopes(key)}")
                print(f"secret: {secret}")
                print("The secret is shown only now; the gateway keeps only its hash.")
            elif args.keys_command == "update":
                # Only the options given are in args (SUPPRESS): the rest stay as they are.
                changes = KeyUpdate.model_validate(
                    {k: v for k, v in vars(args).items() if k in KeyUpdate.model_fields}
                ).changes()
                updated = await store.update(args.id, changes) if changes else await store.get(args.id)
                if updated is None:
                    print(f"llm-gateway keys: no key with id {args.id}", file=sys.stderr)
                    return 1
                print(to_plain_table([_key_row(updated)], KEY_COLUMNS))
            elif args.keys_command == "list":
                print(to_plain_table([_key_row(k) for k in await store.list()], KEY_COLUMNS))
            else:
                revoked = await store.revoke(args.id)
                if revoked is None:
                    print(f"llm-gateway keys: no key with id {args.id}", file=sys.stderr)
                    return 1
                print(f"revoked {revoked.id} ({revoked.name})")
            return 0
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"]))
            print(f"llm-gateway keys: {where + ': ' if where else ''}{err['msg']}", file=sys.stderr)
            return 2
        except GatewayError as exc:
            print(f"llm-gateway keys: {exc.message}", file=sys.stderr)
            return 2
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _reconcile(args: argparse.Namespace) -> int:
    try:
        start = parse_since(args.since)
        end = parse_since(args.until) if args.until else default_range()[1]
    except ValueError as exc:
        print(f"llm-gateway reconcile: {exc}", file=sys.stderr)
        return 2
    if not 0 < (end - start).days <= MAX_DAYS:
        print(f"llm-gateway reconcile: 1 to {MAX_DAYS} days, --since before --until", file=sys.stderr)
        return 2
    settings = load_database_settings() if args.no_fetch else load_settings()

    async def run() -> list[dict[str, Any]]:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            if isinstance(settings, Settings):
                upstream = UpstreamClient(settings)
                await upstream.start()
                try:
                    reader = organization_reader(settings, upstream)
                    await reconcile(engine, reader, start, end, settings.reconcile_timeout_s)
                finally:
                    await upstream.close()
            return await reconciliation.report(engine, start, end)
        finally:
            await engine.dispose()

    try:
        rows = asyncio.run(run())
    except ProviderError as exc:
        print(f"llm-gateway reconcile: {exc}", file=sys.stderr)
        return 1
    if args.format == "table":
        print(reconciliation.to_table(rows))
        return 0
    written = [{**row, **{name: usd(row[name]) for name in reconciliation.MONEY}} for row in rows]
    if args.format == "csv":
        sys.stdout.write(to_csv(written, ("day", "model"), reconciliation.COLUMNS[2:]))
    else:
        sys.stdout.write(orjson.dumps(written, default=str).decode() + "\n")
    return 0


KEY_COLUMNS = (
    "id",
    "name",
    "prefix",
    "feature",
    "scopes",
    "rpm",
    "tpm",
    "budget_day_usd",
    "budget_month_usd",
    "expires_at",
    "last_used_at",
    "state",
)


def _key_row(key: ApiKey) -> dict[str, object]:
    """A key as `keys list` shows it: what GET /admin/keys answers, in a line (times in UTC)."""
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "feature": (key.default_feature + " (pinned)")
        if key.pin_feature and key.default_feature
        else key.default_feature,
        "scopes": _scopes(key),
        "rpm": key.rpm_limit,
        "tpm": key.tpm_limit,
        "budget_day_usd": usd(key.budget_daily_usd) if key.budget_daily_usd is not None else None,
        "budget_month_usd": usd(key.budget_monthly_usd) if key.budget_monthly_usd is not None else None,
        "expires_at": _minute(key.expires_at),
        "last_used_at": _minute(key.last_used_at),
        "state": key.state(datetime.now(UTC)),
    }


def _minute(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def _price_table() -> PriceTable:
    """The shipped prices with GATEWAY_CONFIG's overrides, as the gateway prices calls."""
    path = os.environ.get("GATEWAY_CONFIG") or None
    return PriceTable(load_gateway_config(Path(path) if path else None).prices)


_RATE_COLUMNS = ("input_per_1m", "cached_input_per_1m", "output_per_1m")
_MEDIA_COLUMNS = ("audio_input_per_1m", "audio_output_per_1m", "image_input_per_1m", "image_output_per_1m")


def _rates_row(tier: str, rates: Rates | None) -> dict[str, object]:
    row: dict[str, object] = {"tier": tier}
    for name in _RATE_COLUMNS + _MEDIA_COLUMNS:
        row[name] = None if rates is None else getattr(rates, name)
    if rates is not None and rates.cached_input_per_1m is None:
        row["cached_input_per_1m"] = rates.cached_rate_per_1m
    return row


def _prices(args: argparse.Namespace) -> int:
    table = _price_table()
    if args.prices_command == "list":
        rows = [
            {
                "model": name,
                **{column: getattr(price, column) for column in _RATE_COLUMNS},
                "priority": "yes" if price.priority is not None else "-",
                "media": "yes" if any(getattr(price, c) is not None for c in _MEDIA_COLUMNS) else "-",
                "version": version,
            }
            for name, price, version in table.entries()
        ]
        if args.format == "json":
            sys.stdout.write(orjson.dumps(rows, default=str).decode() + "\n")
        else:
            print(
                f"prices as of {table.as_of} (USD per 1M tokens); `llm-gateway prices show MODEL` for tiers"
            )
            columns = ("model", *_RATE_COLUMNS, "priority", "media", "version")
            print(to_plain_table(rows, columns, frozenset(_RATE_COLUMNS)))
        return 0
    if args.prices_command == "show":
        entry = table.resolve(args.model)
        price = table.price_for(args.model)
        if entry is None or price is None:
            print(f"llm-gateway prices: no price for {args.model!r}: its calls are recorded without cost")
            return 1
        version = table.version(entry)
        print(f"{args.model}: priced by the entry {entry!r}, version {version} (USD per 1M tokens)")
        rows = [_rates_row(tier, price.rates_for(tier)) for tier in TIERS]
        shown: tuple[str, ...] = (
            "tier",
            *_RATE_COLUMNS,
            *(c for c in _MEDIA_COLUMNS if any(r[c] is not None for r in rows)),
        )
        print(to_plain_table(rows, shown, frozenset(shown[1:])))
        if price.priority is None:
            print("priority: OpenAI publishes no Priority rates for it; such calls are recorded without cost")
        return 0
    settings = load_database_settings()
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"llm-gateway prices: {exc}", file=sys.stderr)
        return 2

    async def run() -> list[dict[str, object]]:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            return await unpriced(engine, since)
        finally:
            await engine.dispose()

    found = asyncio.run(run())
    if args.format == "json":
        sys.stdout.write(orjson.dumps(found, default=str).decode() + "\n")
    elif not found:
        print(f"every call since {since} has a price")
    else:
        listed = ("model", "service_tier", "calls", "prompt_tokens", "completion_tokens", "last_seen")
        print(to_plain_table(found, listed, frozenset(("calls", "prompt_tokens", "completion_tokens"))))
    return 0


def _reprice(args: argparse.Namespace) -> int:
    settings = load_database_settings()
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"llm-gateway reprice: {exc}", file=sys.stderr)
        return 2
    table = _price_table()

    async def run() -> list[DayDelta]:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            return await reprice(engine, table, since, model=args.model, dry_run=args.dry_run)
        finally:
            await engine.dispose()

    deltas = asyncio.run(run())
    rows = [d.as_row() for d in deltas]
    if args.format == "json":
        sys.stdout.write(orjson.dumps(rows, default=str).decode() + "\n")
        return 0
    verb = "would change" if args.dry_run else "changed"
    if not rows:
        print(f"no row since {since} needs re-pricing")
        return 0
    numeric = frozenset(("rows", "old_cost_usd", "new_cost_usd", "delta_usd"))
    print(
        to_plain_table(rows, ("day", "model", "rows", "old_cost_usd", "new_cost_usd", "delta_usd"), numeric)
    )
    total = sum((d.delta for d in deltas), start=Decimal(0))
    print(f"{sum(d.rows for d in deltas)} rows {verb}; cost {verb.split()[-1]} by {total:+} USD")
    return 0


def _scopes(key: ApiKey) -> str:
    return ",".join(public(key)["scopes"])


def _nullable(convert: Callable[[str], object], kind: str) -> Callable[[str], object]:
    """An option's value, or None for `none`: how `keys update` clears a limit, a budget or the expiry."""

    def parse(value: str) -> object:
        return None if value.strip().lower() == "none" else convert(value)

    parse.__name__ = kind  # argparse names it in "invalid <kind> value"
    return parse


def _moment(value: str) -> datetime:
    """An ISO date (midnight UTC) or date and time; without an offset, UTC."""
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _comma_list(value: str) -> list[str]:
    return value.split(",")


def _key_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """The options `keys create` and `keys update` share: the fields of POST and PATCH /admin/keys."""
    if update:
        parser.add_argument("id")
        parser.add_argument("--name")
        parser.add_argument("--pin-feature", dest="pin_feature", action=argparse.BooleanOptionalAction)
    else:
        parser.add_argument("name")
        parser.add_argument("--pin-feature", dest="pin_feature", action="store_true", default=None)
    nullable = " ('none' clears it)" if update else ""
    parser.add_argument("--owner", type=_nullable(str, "text"), help="who owns the key" + nullable)
    parser.add_argument("--default-feature", dest="default_feature", type=_nullable(str, "text"))
    parser.add_argument(
        "--allowed-models", dest="allowed_models", type=_nullable(_comma_list, "list"), help="a,b" + nullable
    )
    parser.add_argument(
        "--scopes",
        type=_comma_list,
        help=f"endpoint classes it may call, or '*' for all, and 'reports' to read the usage reports "
        f"(default: {','.join(DEFAULT_SCOPES)})",
    )
    for option, meaning, convert in (
        ("--rpm-limit", "requests a minute", int),
        ("--tpm-limit", "tokens a minute", int),
        ("--budget-daily-usd", "USD a UTC day", str),
        ("--budget-monthly-usd", "USD a UTC month", str),
    ):
        kind = "integer" if convert is int else "amount"
        parser.add_argument(option, type=_nullable(convert, kind), help=meaning + nullable)
    parser.add_argument(
        "--expires-at",
        dest="expires_at",
        type=_nullable(_moment, "date"),
        help="YYYY-MM-DD or an ISO date and time (UTC unless an offset is given)" + nullable,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-gateway", description="OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (GATEWAY_WORKERS, default 1)")
    serve.set_defaults(handler=_serve)
    migrate = commands.add_parser("migrate", help="apply the database migrations (DATABASE_URL)")
    migrate.add_argument(
        "--create-readonly-role",
        metavar="NAME",
        help=f"then create (or update) a login role that can only read the usage tables, for dashboards; "
        f"its password comes from {PASSWORD_ENV}",
    )
    migrate.set_defaults(handler=_migrate)
    usage = commands.add_parser("usage", help="print tokens and cost from usage_daily")
    usage.add_argument(
        "--by", default=DEFAULT_GROUP_BY, help=f"any of day,feature,user,model (default: {DEFAULT_GROUP_BY})"
    )
    usage.add_argument("--since", help="7d, 4w, 3m or YYYY-MM-DD (default: the 1st of this month)")
    usage.add_argument("--until", help="end day, exclusive (default: tomorrow)")
    usage.add_argument("--feature", help="only this feature")
    usage.add_argument("--user", help="only this end user")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    usage.set_defaults(handler=_usage)
    usage_commands = usage.add_subparsers(dest="usage_command")
    prune_parser = usage_commands.add_parser(
        "prune", help="drop the usage events of whole months ending on or before a date (usage_daily kept)"
    )
    prune_parser.add_argument("--before", required=True, help="YYYY-MM-DD")
    prune_parser.set_defaults(handler=_prune)
    recon = commands.add_parser(
        "reconcile", help="read OpenAI's usage and costs; print them beside the gateway's, per day and model"
    )
    recon.add_argument("--since", default="7d", help="7d, 4w, 3m or YYYY-MM-DD (default: 7d)")
    recon.add_argument("--until", help="end day, exclusive (default: tomorrow)")
    recon.add_argument(
        "--no-fetch",
        dest="no_fetch",
        action="store_true",
        help="report from what was read before, asking OpenAI nothing",
    )
    recon.add_argument("--format", choices=["table", "csv", "json"], default="table")
    recon.set_defaults(handler=_reconcile)
    keys = commands.add_parser("keys", help="create, list, update and revoke gateway keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key; its secret is printed once")
    _key_options(create, update=False)
    update = keys_commands.add_parser(
        "update", help="change a key's fields (PATCH /admin/keys/ID)", argument_default=argparse.SUPPRESS
    )
    _key_options(update, update=True)
    keys_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_commands.add_parser("revoke", help="revoke a key at once, on every replica")
    revoke.add_argument("id")
    keys.set_defaults(handler=_keys)
    prices = commands.add_parser("prices", help="the price table, and the models seen without a price")
    prices_commands = prices.add_subparsers(dest="prices_command", required=True)
    prices_list = prices_commands.add_parser("list", help="every entry (GATEWAY_CONFIG overrides included)")
    prices_list.add_argument("--format", choices=["table", "json"], default="table")
    show = prices_commands.add_parser("show", help="the entry a model is priced by, at every tier")
    show.add_argument("model")
    missing = prices_commands.add_parser(
        "unpriced", help="models seen without a price, with calls and tokens"
    )
    missing.add_argument("--since", default="30d", help="30d, 4w, 3m or YYYY-MM-DD (default: 30d)")
    missing.add_argument("--format", choices=["table", "json"], default="table")
    prices.set_defaults(handler=_prices)
    repricing = commands.add_parser(
        "reprice", help="re-price the rows whose price entry has changed, usage_daily with them"
    )
    repricing.add_argument("--since", required=True, help="7d, 4w, 3m or YYYY-MM-DD")
    repricing.add_argument("--model", help="only this model (and its dated snapshots)")
    repricing.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the change only")
    repricing.add_argument("--format", choices=["table", "json"], default="table")
    repricing.set_defaults(handler=_reprice)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 2
    except _DATABASE_ERRORS as exc:
        if args.command == "serve":
            raise
        settings = load_database_settings()
        where = display_url(settings.database_url, settings.data_dir)
        print(f"llm-gateway {args.command}: database {where}: {_database_problem(exc)}", file=sys.stderr)
        return 1
    return code


# What a database that cannot be reached or refuses us raises: the operator's to fix, told in one line
# rather than a traceback. (A DATABASE_URL that is no URL, or names another database, is refused with
# the rest of the configuration.)
_DATABASE_ERRORS = (OSError, TimeoutError, DBAPIError, asyncpg.PostgresError)


def _database_problem(exc: BaseException) -> str:
    """One line on what went wrong with the database, from the driver's own words (never SQLAlchemy's
    rendering, which adds the statement and its parameters)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    if getattr(cause, "sqlstate", None) in SCHEMA_SQLSTATES:
        return BEHIND
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return text[:300] or type(cause).__name__


if __name__ == "__main__":
    sys.exit(main())
