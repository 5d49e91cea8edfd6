"""``gpugate db upgrade``: bring the state database's schema to this gpugate's."""

from __future__ import annotations

import argparse

from serving.cli.client import add_json_option, emit
from serving.cli.local import LOCAL_NOTE, add_database_options, database_of, local


def cmd_upgrade(args: argparse.Namespace) -> int:
    from serving.state import make_engine, upgrade_schema

    url, state_dir = database_of(args)
    engine = make_engine(url, state_dir)
    try:
        change = upgrade_schema(engine)
    finally:
        engine.dispose()
    data = {
        "before": change.before,
        "after": change.after,
        "stamped": change.stamped,
        "changed": change.changed,
    }

    def text(d: dict[str, object]) -> str:
        if not d["changed"]:
            return f"database schema is at revision {d['after']} already"
        return f"database schema upgraded from {d['before'] or 'none'} to {d['after']}"

    emit(args, data, text)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="the state database's schema (admin, on its machine)")
    dsub = db.add_subparsers(dest="db_command", required=True)
    upgrade = dsub.add_parser(
        "upgrade",
        help="upgrade the state database's schema to this gpugate's (admin only)",
        description="Apply the schema migrations this gpugate has and the database lacks; "
        "an unversioned database from before migrations is stamped as the baseline first. "
        "Safe while gateways run and from several machines at once. " + LOCAL_NOTE,
    )
    add_database_options(upgrade)
    add_json_option(upgrade)
    upgrade.set_defaults(func=local(cmd_upgrade))
