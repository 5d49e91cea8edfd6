"""Alembic's environment: runs the revision scripts on the connection it is given.

:mod:`serving.state.migrate` puts an open connection, already inside the schema
lock's transaction, in ``config.attributes["connection"]``; the migrations run in
that transaction and are committed with it. Without one (``--sql``), the SQL is
written out instead, for the dialect of ``sqlalchemy.url``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from serving.state.db import metadata


def run_offline() -> None:
    url = context.config.get_main_option("sqlalchemy.url") or "sqlite://"
    context.configure(
        url=url,
        literal_binds=True,
        target_metadata=metadata,
        render_as_batch=sa.make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online(conn: sa.Connection) -> None:
    context.configure(
        connection=conn,
        target_metadata=metadata,
        # SQLite alters most things only by rebuilding the table; autogenerate then
        # writes batch operations, which do so.
        render_as_batch=conn.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, sa.Connection):
        raise RuntimeError(
            "migrations run through serving.state.migrate, which passes the connection"
        )
    run_online(connection)
