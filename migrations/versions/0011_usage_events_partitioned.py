"""usage_events partitioned by month (Postgres)

Revision ID: 0011
Revises: 0008
Create Date: 2026-12-04

The table is rebuilt from its own definition as it stands (every column earlier migrations gave it, with
its type, default, NOT NULL and identity), its rows copied month by month into the partitions, and its
indexes made again on the partitioned table, which makes them on every partition; views reading the
table are made again from their definitions, and the grants on both given again. A unique key of a
partitioned table must hold the partition key: the primary key becomes (id, created_at) and the
recorder's idempotence key (request_id, created_at); an event keeps its created_at when it is replayed,
so a replay still conflicts with the row it wrote. Runs under an exclusive lock on the table: the
gateway's recorder keeps its events in its spool meanwhile and writes them when the lock is gone.

SQLite (the embedded database) keeps a plain table, with the same unique key.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db.partitions import DEFAULT_PARTITION, add_partition, next_month

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "usage_events_unpartitioned"
# The keys that must change with the partitioning; every other index is made again as it was.
_PRIMARY_KEY = "pk_usage_events"
_OLD_UNIQUE = "uq_usage_events_request_id"
_UNIQUE = "uq_usage_events_request_id_created_at"


def _secondary_indexes(table: str) -> list[str]:
    """CREATE INDEX statements of the table's indexes that back no constraint."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " WHERE i.indrelid = to_regclass(:t)"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
        ),
        {"t": table},
    )
    # A partitioned table's own index reads `ON ONLY`: made on the table, it is made on each partition too.
    return [row[0].replace(" ON ONLY ", " ON ", 1) for row in rows]


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


def _drop_views(views: list[tuple[str, str, str]]) -> None:
    for name, kind, _ in reversed(views):
        op.execute(f"DROP {'MATERIALIZED VIEW' if kind == 'm' else 'VIEW'} {name}")


def _create_views(views: list[tuple[str, str, str]]) -> None:
    for name, kind, definition in views:
        op.execute(f"CREATE {'MATERIALIZED VIEW' if kind == 'm' else 'VIEW'} {name} AS {definition}")


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


def _rename_sequence() -> None:
    # The identity's sequence of a table made by LIKE gets a suffixed name while the old one exists.
    op.execute(
        "DO $$ DECLARE seq text := pg_get_serial_sequence('usage_events', 'id'); BEGIN"
        " IF seq IS DISTINCT FROM 'public.usage_events_id_seq' THEN"
        " EXECUTE format('ALTER SEQUENCE %s RENAME TO usage_events_id_seq', seq); END IF; END $$"
    )


def _restart_identity() -> None:
    op.execute(
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


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        # No partitions in the embedded database; the same idempotence key as Postgres.
        _sqlite_unique(_OLD_UNIQUE, _UNIQUE, ["request_id", "created_at"])
        return
    op.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
    indexes = _secondary_indexes("usage_events")
    views = _dependent_views()
    grants = _grants(["usage_events", *(name for name, _, _ in views)])
    # Views follow a renamed table: they are made again on the new one.
    _drop_views(views)
    op.execute(f"ALTER TABLE usage_events RENAME TO {_OLD}")
    op.execute(
        f"CREATE TABLE usage_events (LIKE {_OLD} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING GENERATED"
        " INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS INCLUDING STATISTICS)"
        " PARTITION BY RANGE (created_at)"
    )
    op.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF usage_events DEFAULT")
    first, last = bind.execute(
        sa.text(
            f"SELECT date_trunc('month', min(created_at) AT TIME ZONE 'UTC')::date,"
            f" date_trunc('month', max(created_at) AT TIME ZONE 'UTC')::date FROM {_OLD}"
        )
    ).one()
    if first is not None:
        # Attached while empty (the rows follow): nothing for ATTACH to check or move.
        month = first
        while month <= last:
            add_partition(bind, month)
            month = next_month(month)
    # Before any index exists: one bulk load per partition instead of index inserts row by row.
    op.execute(f"INSERT INTO usage_events OVERRIDING SYSTEM VALUE SELECT * FROM {_OLD}")
    op.execute(f"DROP TABLE {_OLD}")
    _rename_sequence()
    _restart_identity()
    op.execute(f"ALTER TABLE usage_events ADD CONSTRAINT {_PRIMARY_KEY} PRIMARY KEY (id, created_at)")
    op.execute(f"ALTER TABLE usage_events ADD CONSTRAINT {_UNIQUE} UNIQUE (request_id, created_at)")
    for statement in indexes:
        op.execute(statement)
    _create_views(views)
    for statement in grants:
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        _sqlite_unique(_UNIQUE, _OLD_UNIQUE, ["request_id"])
        return
    op.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
    indexes = _secondary_indexes("usage_events")
    views = _dependent_views()
    grants = _grants(["usage_events", *(name for name, _, _ in views)])
    _drop_views(views)
    op.execute(f"ALTER TABLE usage_events RENAME TO {_OLD}")
    op.execute(
        f"CREATE TABLE usage_events (LIKE {_OLD} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING GENERATED"
        " INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS INCLUDING STATISTICS)"
    )
    op.execute(f"INSERT INTO usage_events OVERRIDING SYSTEM VALUE SELECT * FROM {_OLD}")
    op.execute(f"DROP TABLE {_OLD}")
    _rename_sequence()
    _restart_identity()
    op.execute(f"ALTER TABLE usage_events ADD CONSTRAINT {_PRIMARY_KEY} PRIMARY KEY (id)")
    op.execute(f"ALTER TABLE usage_events ADD CONSTRAINT {_OLD_UNIQUE} UNIQUE (request_id)")
    for statement in indexes:
        op.execute(statement)
    _create_views(views)
    for statement in grants:
        op.execute(statement)
