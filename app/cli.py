"""`llm-gateway serve | ...`: the console entry point."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta

import orjson
import uvicorn
from pydantic import ValidationError

from app.config import ConfigError, DatabaseSettings, Settings, load_database_settings, load_settings
from app.config_file import load_config_file
from app.db.engine import create_engine
from app.db.migrate import upgrade
from app.db.readonly_role import PASSWORD_ENV, REPORTING_TABLES, create_readonly_role
from app.endpoint_classes import DEFAULT_SCOPES
from app.keys import ApiKey, KeyStore
from app.logs import configure_logging
from app.metering.metrics import WORKER_METRICS_DIR
from app.reconcile import store as reconciliation
from app.reconcile.job import organization_reader, reconcile
from app.reconcile.provider import MAX_DAYS, ProviderError
from app.reporting import (
    UsageQuery,
    parse_group_by,
    parse_since,
    to_csv,
    to_plain_table,
    to_table,
    usage_report,
)
from app.routes.admin import KeyCreate
from app.upstream import UpstreamClient


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    load_config_file(settings.config_file)
    configure_logging(settings.log_level)
    workers = args.workers or settings.workers
    if workers > 1:
        _share_worker_metrics()
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


def _http_protocol(settings: Settings) -> type[asyncio.Protocol] | str:
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    from app.http_head import head_limited_protocol

    return head_limited_protocol(settings)


def _migrate(args: argparse.Namespace) -> int:
    settings = load_database_settings()
    upgrade(settings.database_url, settings.data_dir)
    print("llm-gateway: database is at the latest schema")
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
    try:
        groups = parse_group_by(args.by)
        start = parse_since(args.since)
        end = parse_since(args.until) if args.until else None
    except ValueError as exc:
        print(f"llm-gateway usage: {exc}", file=sys.stderr)
        return 2
    filters = {name: value for name in ("feature", "user", "model") if (value := getattr(args, name))}

    async def report() -> list[dict[str, object]]:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            query = UsageQuery(start, end or _tomorrow(), groups, filters)
            return await usage_report(engine, query)
        finally:
            await engine.dispose()

    rows = asyncio.run(report())
    if args.format == "csv":
        sys.stdout.write(to_csv(rows, groups))
    elif args.format == "json":
        sys.stdout.write(orjson.dumps(rows, default=str).decode() + "\n")
    else:
        print(to_table(rows, groups))
    return 0


def _keys(args: argparse.Namespace) -> int:
    settings = load_database_settings()

    async def run() -> int:
        engine = create_engine(settings.database_url, settings.data_dir)
        store = KeyStore(engine)
        try:
            if args.keys_command == "create":
                try:
                    spec = KeyCreate.model_validate(
                        {k: v for k, v in vars(args).items() if k in KeyCreate.model_fields and v is not None}
                    )
                except ValidationError as exc:
                    err = exc.errors()[0]
                    print(
                        f"llm-gateway keys: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr
                    )
                    return 2
                key, secret = await store.create(spec.model_dump())
                print(f"created {key.id} ({key.name}), scopes: {_scopes(key)}")
                print(f"secret: {secret}")
                print("The secret is shown only now; the gateway keeps only its hash.")
            elif args.keys_command == "list":
                keys = await store.list()
                rows = [
                    {
                        "id": k.id,
                        "name": k.name,
                        "prefix": k.prefix,
                        "feature": k.default_feature,
                        "scopes": _scopes(k),
                        "state": "revoked" if k.revoked_at else "active",
                    }
                    for k in keys
                ]
                print(to_plain_table(rows, ("id", "name", "prefix", "feature", "scopes", "state")))
            else:
                revoked = await store.revoke(args.id)
                if revoked is None:
                    print(f"llm-gateway keys: no key with id {args.id}", file=sys.stderr)
                    return 1
                print(f"revoked {revoked.id} ({revoked.name})")
            return 0
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _reconcile(args: argparse.Namespace) -> int:
    try:
        start = parse_since(args.since)
        end = parse_since(args.until) if args.until else _tomorrow()
    except ValueError as exc:
        print(f"llm-gateway reconcile: {exc}", file=sys.stderr)
        return 2
    if not 0 < (end - start).days <= MAX_DAYS:
        print(f"llm-gateway reconcile: 1 to {MAX_DAYS} days, --since before --until", file=sys.stderr)
        return 2
    settings = load_database_settings() if args.no_fetch else load_settings()

    async def run() -> list[dict[str, object]]:
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
    if args.format == "csv":
        sys.stdout.write(to_csv(rows, ("day", "model"), reconciliation.COLUMNS[2:]))
    elif args.format == "json":
        sys.stdout.write(orjson.dumps(rows, default=str).decode() + "\n")
    else:
        print(reconciliation.to_table(rows))
    return 0


def _scopes(key: ApiKey) -> str:
    return ",".join(key.public()["scopes"])


def _tomorrow() -> date:
    return datetime.now(UTC).date() + timedelta(days=1)


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
    usage.add_argument("--by", default="feature", help="any of day,feature,user,model (default: feature)")
    usage.add_argument("--since", default="7d", help="7d, 4w, 3m or YYYY-MM-DD (default: 7d)")
    usage.add_argument("--until", help="end day, exclusive (default: tomorrow)")
    usage.add_argument("--feature", help="only this feature")
    usage.add_argument("--user", help="only this end user")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    usage.set_defaults(handler=_usage)
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
    keys = commands.add_parser("keys", help="create, list and revoke gateway keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("name")
    create.add_argument("--owner")
    create.add_argument("--default-feature", dest="default_feature")
    create.add_argument("--pin-feature", dest="pin_feature", action="store_true", default=None)
    create.add_argument("--allowed-models", dest="allowed_models", type=lambda v: v.split(","))
    create.add_argument(
        "--scopes",
        type=lambda v: v.split(","),
        help=f"endpoint classes it may call, or '*' for all, and 'reports' to read the usage reports "
        f"(default: {','.join(DEFAULT_SCOPES)})",
    )
    create.add_argument("--rpm-limit", dest="rpm_limit", type=int)
    create.add_argument("--tpm-limit", dest="tpm_limit", type=int)
    create.add_argument("--budget-daily-usd", dest="budget_daily_usd")
    create.add_argument("--budget-monthly-usd", dest="budget_monthly_usd")
    keys_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_commands.add_parser("revoke", help="revoke a key at once, on every replica")
    revoke.add_argument("id")
    keys.set_defaults(handler=_keys)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
