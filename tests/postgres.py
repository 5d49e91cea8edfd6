"""PostgreSQL for the tests: the server GPUGATE_TEST_POSTGRES_URL names, or a throwaway one.

Without that variable, :func:`start_throwaway` runs a private server for the test
session: ``initdb`` into a temporary folder and ``postgres`` on a free port of
127.0.0.1, with its unix socket in that folder too. The binaries are looked up on
PATH, in /usr/lib/postgresql/*/bin and at ``pg_config --bindir``; failing those, the
PyPI package ``pgserver`` is used when it is installed. PostgreSQL refuses to run as
root, so under root the server runs as the ``postgres`` system user, or ``nobody``,
which then owns the folder. :class:`Unavailable` says what was tried when nothing
worked.

Each test works in a schema of its own (:func:`fresh_schema`), reached through a URL
whose connections set ``search_path`` to it, so tests never see each other's tables.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

URL_ENV = "GPUGATE_TEST_POSTGRES_URL"
SKIP_ENV = "GPUGATE_SKIP_POSTGRES"
# The users a root test run may hand the server to, in order of preference.
SERVER_USERS = ("postgres", "nobody")
START_TIMEOUT_S = 60
FOLDER_PREFIX = "gpugate-pg-"
OWNER_FILE = "owner.pid"  # the test process's PID; the folder is removable once it is gone
_PR_SET_PDEATHSIG = 1


class Unavailable(RuntimeError):
    """No PostgreSQL server could be started; the message names every attempt."""


@dataclass
class Server:
    """A PostgreSQL server reachable at ``url`` (a superuser on its ``postgres`` database)."""

    url: str
    how: str  # what it is, for messages: "GPUGATE_TEST_POSTGRES_URL", "throwaway ..."
    proc: subprocess.Popen[bytes] | None = None
    folder: Path | None = None
    _cleanup: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        """Stop a server this process started (by its PID) and remove its folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stop in self._cleanup:
            stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class Schema:
    """A fresh schema on a server: ``url`` connects with ``search_path`` set to it (what
    ``gpugate serve --database-url`` and ``open_engine`` take); ``admin_url`` does not."""

    name: str
    url: str
    admin_url: str


def server() -> Server:
    """The server the tests use: GPUGATE_TEST_POSTGRES_URL's, else a throwaway one."""
    given = os.environ.get(URL_ENV)
    if given:
        return Server(url=given, how=URL_ENV)
    return start_throwaway()


@contextlib.contextmanager
def fresh_schema(server_url: str) -> Iterator[Schema]:
    """A new, empty schema for the block; dropped with everything in it afterwards."""
    name = f"gg_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, poolclass=sa.NullPool)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        url = (
            sa.make_url(server_url)
            .update_query_dict({"options": f"-csearch_path={name}"})
            .render_as_string(hide_password=False)
        )
        try:
            yield Schema(name=name, url=url, admin_url=server_url)
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    finally:
        admin.dispose()


# --- the throwaway server ------------------------------------------------------------


def start_throwaway() -> Server:
    """Start a private server; raise :class:`Unavailable` naming each attempt if none runs."""
    tried: list[str] = []
    for bindir in bin_dirs():
        try:
            return _start_from(bindir)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            tried.append(f"{bindir}: {exc}")
    if not tried:
        tried.append("no initdb/postgres on PATH, in /usr/lib/postgresql/*/bin or pg_config")
    try:
        return _start_pgserver()
    except ImportError:
        tried.append("the PyPI package pgserver is not installed")
    except Exception as exc:  # pgserver's own failures have no common base class
        tried.append(f"pgserver: {exc}")
    raise Unavailable("no PostgreSQL server could be started: " + "; ".join(tried))


def bin_dirs() -> list[Path]:
    """Folders holding both ``initdb`` and ``postgres``, most likely first, no repeats."""
    found: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        found.append(Path(on_path).resolve().parent)
    found.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True))
    if shutil.which("pg_config"):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out:
            found.append(Path(out))
    usable: list[Path] = []
    for d in found:
        if d not in usable and (d / "initdb").is_file() and (d / "postgres").is_file():
            usable.append(d)
    return usable


def _version(bindir: Path) -> float:
    try:
        return float(bindir.parent.name)
    except ValueError:
        return 0.0


def _server_user() -> pwd.struct_passwd | None:
    """The user to run the server as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError(f"running as root and none of the users {SERVER_USERS} exists")


def _start_from(bindir: Path) -> Server:
    user = _server_user()
    _remove_orphans()
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    (folder / OWNER_FILE).write_text(str(os.getpid()))
    try:
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = _as(user, folder)
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "--pgdata",
                str(folder / "data"),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **as_user,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {(init.stderr or init.stdout).strip()[-500:]}")
        last = ""
        for _ in range(3):  # the free port may be taken before the server binds it
            port = _free_port()
            log_path = folder / "postgres.log"
            with log_path.open("ab") as log_file:
                proc = subprocess.Popen(
                    [
                        str(bindir / "postgres"),
                        "-D",
                        str(folder / "data"),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "-k",
                        str(folder),
                        # A test server: durability buys nothing, speed does.
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=200",
                    ],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                    **as_user,
                )
            url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
            server = Server(url=url, how=f"throwaway server from {bindir}", proc=proc)
            if _wait_ready(server):
                server.folder = folder
                return server
            server.stop()
            last = log_path.read_text(errors="replace").strip()[-500:]
        raise RuntimeError(f"postgres did not start: {last}")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _remove_orphans() -> None:
    """Remove the folders of throwaway servers whose test process was killed outright
    (the server itself died with it)."""
    for folder in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, and another user's


def _as(user: pwd.struct_passwd | None, home: Path) -> dict[str, Any]:
    """subprocess keywords that run a child as ``user`` (with only its own group)."""
    env = {**os.environ, "LC_ALL": "C", "HOME": str(home)}
    env.pop("PGDATA", None)
    if user is None:
        return {"env": env}
    return {
        "env": {**env, "USER": user.pw_name, "LOGNAME": user.pw_name},
        "user": user.pw_uid,
        "group": user.pw_gid,
        "extra_groups": [],
        "cwd": str(home),  # the server user may not be allowed into ours
    }


def _die_with_parent() -> None:
    """In the child: if the test process dies without stopping the server (SIGKILL),
    the kernel stops it too, so no server outlives its run."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(server: Server) -> bool:
    assert server.proc is not None
    engine = sa.create_engine(server.url, poolclass=sa.NullPool)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                return False
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.OperationalError:
                time.sleep(0.1)
        return False
    finally:
        engine.dispose()


def _start_pgserver() -> Server:
    folder = Path(tempfile.mkdtemp(prefix="gpugate-pgserver-"))
    try:
        with warnings.catch_warnings():
            # It warns about the environment it works around (no XDG_RUNTIME_DIR, say),
            # which the suite's warnings-as-errors would turn into a failure to start.
            warnings.simplefilter("ignore")
            import pgserver

            pg = pgserver.get_server(folder, cleanup_mode="stop")
        url = sa.make_url(pg.get_uri()).set(drivername="postgresql+psycopg")
        server = Server(
            url=url.render_as_string(hide_password=False), how="throwaway server from pgserver"
        )
        server.folder = folder
        server._cleanup.append(pg.cleanup)
        return server
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
