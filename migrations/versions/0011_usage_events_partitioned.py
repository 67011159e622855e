"""usage_events partitioned by month (Postgres)

Revision ID: 0011
Revises: 0008
Create Date: 2026-12-04

Online on Postgres: the table is not copied. The old table becomes the first partition,
usage_events_before_YYYYMM (every event before that month, the first after next or later), and month
partitions follow it. The gateway goes on writing and reading while the slow steps run, each in its own
transaction under a lock that lets inserts and queries through:

1. a CHECK that every row is before the bound, added NOT VALID (no scan; an exclusive lock for an
   instant) and then validated (a scan under SHARE UPDATE EXCLUSIVE);
2. the two unique indexes a partition of the new table needs (a unique key of a partitioned table must
   hold the partition key: the primary key becomes (id, created_at) and the recorder's idempotence key
   (request_id, created_at)), built CONCURRENTLY; an event keeps its created_at when it is replayed, so a
   replay still conflicts with the row it wrote;
3. one short transaction under an exclusive lock: the table renamed, the partitioned table made from its
   definition as it stands (every column earlier migrations gave it, with its type, default, NOT NULL and
   identity), the old table attached as its partition (the validated CHECK spares ATTACH its scan), and
   the indexes made on the partitioned table, which adopts the old table's matching ones instead of
   building them; views reading the table are made again from their definitions, and the grants on
   both given again. It waits at most a few seconds for its lock (queued behind a long query, it would
   hold up every insert queued behind it) and is tried again.

An interrupted run leaves the table as it was, plus the CHECK or an index, which the next run takes up.
An empty table (a new installation) is replaced rather than attached. Databases that ran an earlier
version of this migration, which copied the rows under an exclusive lock, have month partitions only and
are not touched again. The downgrade copies the rows into a plain table under an exclusive lock.

SQLite (the embedded database) keeps a plain table, with the same unique key.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from app.db.partitions import DEFAULT_PARTITION, before_partition_name, next_month

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "usage_events_unpartitioned"
# The keys that must change with the partitioning; every other index is made again as it was.
_PRIMARY_KEY = "pk_usage_events"
_OLD_UNIQUE = "uq_usage_events_request_id"
_UNIQUE = "uq_usage_events_request_id_created_at"
# What the online conversion adds to the old table before it becomes a partition.
_CHECK = "usage_events_before_bound"
_PART_PRIMARY_KEY = "usage_events_before_pkey"
_PART_UNIQUE = "usage_events_before_request_id_created_at_key"
_LOCK_TIMEOUT = "3s"
_LOCK_ATTEMPTS = 40
_LOCK_NOT_AVAILABLE = "55P03"
_QUOTE = "$llm_gateway_0011$"


def _secondary_indexes(table: str) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of the table's indexes that back no constraint, bar the ones this
    migration builds for the partition."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " WHERE i.indrelid = to_regclass(:t)"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
            " AND i.indexrelid::regclass::text NOT IN (:pk, :uq)"
        ),
        {"t": table, "pk": _PART_PRIMARY_KEY, "uq": _PART_UNIQUE},
    )
    # A partitioned table's own index reads `ON ONLY`: made on the table, it is made on each partition too.
    return [(row[0], row[1].replace(" ON ONLY ", " ON ", 1)) for row in rows]


def _dependent_views() -> list[tuple[str, str, str]]:
    """(name, relkind, definition) of every view reading usage_events, directly or through another view,
    those it reads first. Taken before the table is renamed, so the definitions name usage_events."""
    rows = op.get_bind().execute(
        sa.text(
            """
            WITH RECURSIVE deps(oid, depth) AS (
                SELECT r.ev_class, 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                WHERE d.refobjid = 'usage_events'::regclass AND r.ev_class <> 'usage_events'::regclass
                UNION
                SELECT r.ev_class, deps.depth + 1 FROM deps
                JOIN pg_depend d ON d.refobjid = deps.oid JOIN pg_rewrite r ON r.oid = d.objid
                WHERE r.ev_class <> deps.oid AND deps.depth < 20
            )
            SELECT c.oid::regclass::text AS name, c.relkind::text AS kind, pg_get_viewdef(c.oid) AS definition
            FROM deps JOIN pg_class c ON c.oid = deps.oid
            GROUP BY c.oid, c.relkind ORDER BY max(deps.depth), 1
            """
        )
    )
    return [(row.name, row.kind, row.definition) for row in rows]


def _drop_views(views: list[tuple[str, str, str]]) -> list[str]:
    return [
        f"DROP {'MATERIALIZED VIEW' if kind == 'm' else 'VIEW'} {name}" for name, kind, _ in reversed(views)
    ]


def _create_views(views: list[tuple[str, str, str]]) -> list[str]:
    return [
        f"CREATE {'MATERIALIZED VIEW' if kind == 'm' else 'VIEW'} {name} AS {definition}"
        for name, kind, definition in views
    ]


def _grants(names: list[str]) -> list[str]:
    """GRANT statements giving back what others than the owner were granted on these tables and views
    (a dashboards' read-only role, say): a table or view made anew starts with none."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT c.oid::regclass::text AS name, a.privilege_type AS privilege, a.is_grantable AS again,"
            " CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee"
            " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
            " LEFT JOIN pg_roles r ON r.oid = a.grantee"
            " WHERE c.oid = ANY(CAST(:names AS regclass[])) AND a.grantee <> c.relowner"
        ),
        {"names": names},
    )
    return [
        f"GRANT {row.privilege} ON {row.name} TO {row.grantee}{' WITH GRANT OPTION' if row.again else ''}"
        for row in rows
    ]


# The identity's sequence of a table made by LIKE gets a suffixed name while the old one exists.
_RENAME_SEQUENCE = (
    "DO $$ DECLARE seq text := pg_get_serial_sequence('usage_events', 'id'); BEGIN"
    " IF seq IS DISTINCT FROM 'public.usage_events_id_seq' THEN"
    " EXECUTE format('ALTER SEQUENCE %s RENAME TO usage_events_id_seq', seq); END IF; END $$"
)
_RESTART_IDENTITY = (
    "SELECT setval(pg_get_serial_sequence('usage_events', 'id'), coalesce(max(id), 0) + 1, false)"
    " FROM usage_events"
)


def _sqlite_unique(old: str, new: str, columns: list[str]) -> None:
    """SQLite changes a constraint by copying the table under a new name and renaming it back. Its
    legacy rename leaves views alone: they name usage_events, which exists again once the copy is renamed
    (the modern one checks every view while the table is away, and fails on any that reads it)."""
    op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("usage_events") as batch:
        batch.drop_constraint(old, type_="unique")
        batch.create_unique_constraint(new, columns)
    op.execute("PRAGMA legacy_alter_table = OFF")


def _bound(bind: Connection) -> date:
    """The first day after every row the old table keeps: the first of the month after next (inserts go
    on while the CHECK is validated, and must still pass it), or later if a row is later."""
    today = datetime.now(UTC).date()
    latest = bind.execute(sa.text("SELECT max(created_at) FROM usage_events")).scalar()
    bound = next_month(next_month(today.replace(day=1)))
    if latest is not None:
        bound = max(bound, next_month(latest.astimezone(UTC).date().replace(day=1)))
    return bound


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Says how long each step took: on a large table the slow ones take a while."""
    started = time.monotonic()
    yield
    _say(f"{what}: {time.monotonic() - started:.2f} s")


def _say(message: str) -> None:
    # On stderr: `llm-gateway migrate` lists on stdout what it applied.
    print(f"llm-gateway: migration 0011: {message}", file=sys.stderr, flush=True)


def _briefly(step: str, statement: str) -> None:
    """One statement, a transaction of its own, that waits at most _LOCK_TIMEOUT for a lock, and again
    after a pause while the lock stays busy. One statement: the lock must not be held across round trips
    to this process, which a busy machine may leave waiting for its turn."""
    bind = op.get_bind()
    bind.exec_driver_sql(f"SET lock_timeout = '{_LOCK_TIMEOUT}'")
    try:
        for attempt in range(1, _LOCK_ATTEMPTS + 1):
            try:
                bind.exec_driver_sql(statement)
                return
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE or attempt == _LOCK_ATTEMPTS:
                    raise
            _say(f"usage_events is busy ({step}), trying again ({attempt}/{_LOCK_ATTEMPTS})")
            time.sleep(1)
    finally:
        bind.exec_driver_sql("RESET lock_timeout")


def _unique_index(name: str, columns: str) -> None:
    """Built CONCURRENTLY: inserts go on. One left invalid by an interrupted build is built again."""
    bind = op.get_bind()
    valid = bind.execute(
        sa.text("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(:n)"), {"n": name}
    ).scalar()
    if valid is False:
        bind.exec_driver_sql(f"DROP INDEX CONCURRENTLY {name}")
    if valid is not True:
        bind.exec_driver_sql(f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON usage_events ({columns})")


def _switch(bound: date) -> str:
    """The switch, as one DO block. What it makes again (indexes, views, grants) is read beforehand."""
    part = before_partition_name(bound)
    indexes = _secondary_indexes("usage_events")
    views = _dependent_views()
    grants = _grants(["usage_events", *(name for name, _, _ in views)])
    first = [
        # Views follow a renamed table: they are made again on the new one.
        *_drop_views(views),
        f"ALTER TABLE usage_events RENAME TO {part}",
        f"CREATE TABLE usage_events (LIKE {part} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING GENERATED"
        " INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS INCLUDING STATISTICS)"
        " PARTITION BY RANGE (created_at)",
        f"ALTER TABLE usage_events DROP CONSTRAINT {_CHECK}",
    ]
    attach = [
        # The partitioned table's identity numbers the new rows; the keys become the partition's own,
        # made from the indexes built beforehand; the index names go to the partitioned table's indexes.
        f"ALTER TABLE {part} ALTER COLUMN id DROP IDENTITY, DROP CONSTRAINT {_PRIMARY_KEY},"
        f" ADD CONSTRAINT {_PART_PRIMARY_KEY} PRIMARY KEY USING INDEX {_PART_PRIMARY_KEY},"
        f" DROP CONSTRAINT {_OLD_UNIQUE}, ADD CONSTRAINT {_PART_UNIQUE} UNIQUE USING INDEX {_PART_UNIQUE}",
        *(f"ALTER INDEX {name} RENAME TO {(part + '_' + name)[:63]}" for name, _ in indexes),
        f"ALTER TABLE usage_events ATTACH PARTITION {part}"
        f" FOR VALUES FROM (MINVALUE) TO ('{bound.isoformat()} 00:00:00+00')",
        f"ALTER TABLE {part} DROP CONSTRAINT {_CHECK}",
    ]
    last = [
        f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF usage_events DEFAULT",
        _RENAME_SEQUENCE,
        f"ALTER TABLE usage_events ADD CONSTRAINT {_PRIMARY_KEY} PRIMARY KEY (id, created_at)",
        f"ALTER TABLE usage_events ADD CONSTRAINT {_UNIQUE} UNIQUE (request_id, created_at)",
        *(statement for _, statement in indexes),
        # The new rows' ids follow the old ones: the largest is read from its index.
        _RESTART_IDENTITY,
        *_create_views(views),
        *grants,
    ]

    def run(statements: list[str]) -> str:
        for statement in statements:
            if _QUOTE in statement:
                raise RuntimeError(f"cannot quote {statement!r}")
        return " ".join(f"EXECUTE {_QUOTE}{statement}{_QUOTE};" for statement in statements)

    # An empty table (a new installation) is not kept as a partition.
    return (
        "DO $switch$ BEGIN LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE;"
        f" IF EXISTS (SELECT 1 FROM usage_events) THEN {run(first + attach)}"
        f" ELSE {run([*first, f'DROP TABLE {part}'])} END IF; {run(last)} END $switch$"
    )


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        # No partitions in the embedded database; the same idempotence key as Postgres.
        _sqlite_unique(_OLD_UNIQUE, _UNIQUE, ["request_id", "created_at"])
        return
    # Each step commits on its own: one transaction would keep the first step's exclusive lock to its end.
    with op.get_context().autocommit_block():
        bound = _bound(bind)
        with _step(f"CHECK created_at < {bound} added"):
            _briefly(
                "check",
                f"ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS {_CHECK}, ADD CONSTRAINT {_CHECK}"
                f" CHECK (created_at < '{bound.isoformat()} 00:00:00+00') NOT VALID",
            )
        with _step("CHECK validated (inserts and reads go on)"):
            op.execute(f"ALTER TABLE usage_events VALIDATE CONSTRAINT {_CHECK}")
        with _step("unique index (id, created_at) built (inserts and reads go on)"):
            _unique_index(_PART_PRIMARY_KEY, "id, created_at")
        with _step("unique index (request_id, created_at) built (inserts and reads go on)"):
            _unique_index(_PART_UNIQUE, "request_id, created_at")
        switch = _switch(bound)
        with _step("partitioned, under an exclusive lock (its wait included)"):
            _briefly("switch", switch)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        _sqlite_unique(_UNIQUE, _OLD_UNIQUE, ["request_id"])
        return
    op.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
    indexes = _secondary_indexes("usage_events")
    views = _dependent_views()
    grants = _grants(["usage_events", *(name for name, _, _ in views)])
    for statement in [
        *_drop_views(views),
        f"ALTER TABLE usage_events RENAME TO {_OLD}",
        f"CREATE TABLE usage_events (LIKE {_OLD} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING GENERATED"
        " INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS INCLUDING STATISTICS)",
        f"INSERT INTO usage_events OVERRIDING SYSTEM VALUE SELECT * FROM {_OLD}",
        f"DROP TABLE {_OLD}",
        _RENAME_SEQUENCE,
        _RESTART_IDENTITY,
        f"ALTER TABLE usage_events ADD CONSTRAINT {_PRIMARY_KEY} PRIMARY KEY (id)",
        f"ALTER TABLE usage_events ADD CONSTRAINT {_OLD_UNIQUE} UNIQUE (request_id)",
        *(statement for _, statement in indexes),
        *_create_views(views),
        *grants,
    ]:
        op.execute(statement)
