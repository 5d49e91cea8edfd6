"""The few commands that open the state database directly, with its credentials: the
first admin of an empty database (``users bootstrap``), schema upgrades (``db
upgrade``) and an offline check of the audit chain (``audit verify --offline``).

They are for an admin on a machine that holds those credentials; every other command
is a client of the admin API. Their errors are answered from the same table as the
API's (serving.admin.errors).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.client import Command, CommandError, state_dir_of

if TYPE_CHECKING:
    import sqlalchemy as sa

LOCAL_NOTE = (
    "Admin only: opens the state database directly, so it needs the database's "
    "credentials (--database-url or $GPUGATE_DATABASE_URL) or the state folder's SQLite "
    "file; it does not go through the gateway."
)


def add_database_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        help="state folder whose gpugate.db is the database when no URL is given (default "
        "$GPUGATE_STATE_DIR, else ./.gpugate)",
    )
    p.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the state database (default $GPUGATE_DATABASE_URL, else "
        "SQLite in the state folder)",
    )


def database_of(args: argparse.Namespace) -> tuple[str | None, Path]:
    """The database URL (None: SQLite in the state folder) and the state folder."""
    return args.database_url or os.environ.get("GPUGATE_DATABASE_URL"), state_dir_of(args.state_dir)


def existing_engine(args: argparse.Namespace) -> sa.Engine:
    """An engine on a database that must exist already; its schema is not touched."""
    from serving.state import SQLITE_FILENAME, make_engine

    url, state_dir = database_of(args)
    if url is None and not (state_dir / SQLITE_FILENAME).is_file():
        raise CommandError(f"no state database at {state_dir / SQLITE_FILENAME}")
    return make_engine(url, state_dir)


def local(command: Command) -> Command:
    """Run a database command; a refusal of the state code exits with the error table's
    code, printing the error in full (the caller holds the credentials)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CommandError:
            raise
        except Exception as exc:
            from serving.admin import exit_code_for

            code = exit_code_for(exc)
            if code is None:
                raise
            print(f"gpugate: error: {exc}", file=sys.stderr)
            return code

    return run
