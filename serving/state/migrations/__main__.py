"""Alembic's command line on gpugate's migrations, for writing revisions.

``python -m serving.state.migrations ARGS`` takes Alembic's own commands and options
(``revision --autogenerate -m MESSAGE``, ``check``, ``history``, ``upgrade head
--sql``...). The database they compare with or write to is ``$GPUGATE_MIGRATIONS_URL``
(a name of its own, so the gateway's ``$GPUGATE_DATABASE_URL`` is never picked up by
accident), else a scratch SQLite database brought to the newest revision first, which is what
``revision --autogenerate`` and ``check`` need to see what the metadata adds.
Real databases are upgraded with ``gpugate db upgrade``, which holds the schema lock.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from alembic.config import CommandLine

from serving.state.db import make_engine
from serving.state.migrate import alembic_config, upgrade_schema


def main(argv: Sequence[str] | None = None) -> None:
    cli = CommandLine(prog="python -m serving.state.migrations")
    options = cli.parser.parse_args(argv)
    if not hasattr(options, "cmd"):
        cli.parser.error("too few arguments")
    config = alembic_config()
    config.cmd_opts = options
    url = os.environ.get("GPUGATE_MIGRATIONS_URL")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if getattr(options, "sql", False):
        cli.run_cmd(config, options)  # offline: writes SQL, connects to nothing
        return
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(url, Path(scratch))
        try:
            if url is None:
                upgrade_schema(engine)
            with engine.connect() as conn, conn.begin():
                config.attributes["connection"] = conn
                cli.run_cmd(config, options)
        finally:
            engine.dispose()


if __name__ == "__main__":
    main()
