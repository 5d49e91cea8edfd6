"""Helpers for the state tests: databases with no schema yet, what a schema looks like
in the catalog, and every row of every table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from serving.state import make_engine, metadata, open_engine
from serving.state.migrate import VERSION_TABLE


@dataclass
class Blank:
    """An empty database. ``url`` is None for the embedded default (SQLite in
    ``state_dir``), else what ``--database-url`` would be; ``admin_url`` reaches the
    PostgreSQL server outside the test's schema."""

    url: str | None
    state_dir: Path
    kind: str
    admin_url: str | None = None
    engines: list[sa.Engine] = field(default_factory=list)

    def engine(self) -> sa.Engine:
        """An engine that checks nothing (as ``gpugate db upgrade`` opens one)."""
        engine = make_engine(self.url, self.state_dir)
        self.engines.append(engine)
        return engine

    def open(self) -> sa.Engine:
        """What ``gpugate serve`` opens: the schema checked (and maybe upgraded)."""
        engine = open_engine(self.url, self.state_dir)
        self.engines.append(engine)
        return engine

    def dispose(self) -> None:
        for engine in self.engines:
            engine.dispose()


def metadata_differences(engine: sa.Engine) -> list[Any]:
    """What Alembic's autogenerate finds between the database and ``metadata``."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def catalog(engine: sa.Engine) -> dict[str, Any]:
    """The schema as the database itself describes it, without the version table:
    SQLite's CREATE statements; PostgreSQL's columns, constraints, indexes, sequences."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(
                "SELECT type, name, tbl_name, sql FROM sqlite_master "
                "WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
            ).all()
            return {
                r.name: (r.type, r.tbl_name, r.sql) for r in rows if r.tbl_name != VERSION_TABLE
            }
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        queries = {
            "columns": "SELECT table_name, column_name, ordinal_position, data_type, "
            "character_maximum_length, numeric_precision, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = current_schema()",
            "constraints": "SELECT conrelid::regclass::text, conname, contype, "
            "pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = current_schema()::regnamespace",
            "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema()",
            "sequences": "SELECT sequencename, data_type, start_value, increment_by "
            "FROM pg_sequences WHERE schemaname = current_schema()",
        }
        found: dict[str, Any] = {}
        for what, sql in queries.items():
            cleaned: list[tuple[Any, ...]] = [
                tuple(re.sub(rf"\b{schema}\.", "", v) if isinstance(v, str) else v for v in r)
                for r in conn.exec_driver_sql(sql).all()
            ]
            found[what] = sorted((r for r in cleaned if VERSION_TABLE not in str(r[0])), key=repr)
        return found


def all_rows(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every gpugate table the database has, as the driver returns it, in
    primary-key order (an old database lacks the tables later revisions made)."""
    rows = {}
    with engine.connect() as conn:
        present = set(sa.inspect(conn).get_table_names())
        for name, table in sorted(metadata.tables.items()):
            if name not in present:
                continue
            order = ", ".join(f'"{c.name}"' for c in table.primary_key.columns)
            result = conn.exec_driver_sql(f'SELECT * FROM "{name}" ORDER BY {order}')
            rows[name] = [tuple(r) for r in result]
    return rows
