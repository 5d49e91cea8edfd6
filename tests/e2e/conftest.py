"""A real `gpugate serve` subprocess, shared by the e2e tests of a module."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

GPUGATE = str(Path(sys.executable).with_name("gpugate"))
READY_TIMEOUT_S = 180


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port the kernel picked for a bind
    to 0 lies in that range, where the outgoing connections of Ray and the tests take
    ports too: one could take it before the gateway binds it ("Address already in use").
    Ray's workers listen on 10002-19999 by default, and `ray start` refuses ports there."""
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(20_000, max(20_001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free ports (several gateways on one node scrape on
    the metrics port + their rank)."""
    while True:
        first = free_port()
        if first + n > 65536:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + n):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    state_dir: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    demo_key: str
    lines: list[str] = field(default_factory=list)
    config: Path | None = None  # the --config it was started with
    args: tuple[str, ...] = ()  # the options it was started with beyond its ports

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        """The gateway's HTTP address, as the CLI's ``--url`` takes it."""
        return f"http://{self.http_url}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A ``gpugate`` client command against this gateway; without ``--token`` it acts
        as the admin whose token is in the state folder."""
        return subprocess.run(
            [GPUGATE, *args, "--url", self.url, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def admin_cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        """A client command as the user of ``token`` (default: the state folder's admin)."""
        return self.cli(*args, *(["--token", token] if token else []))

    def restart(self) -> None:
        """SIGTERM, then start again on the same state, config and database (new ports)."""
        assert self.stop() == 0
        new = start_gateway(self.state_dir, *self.args)
        self.proc, self.http_port, self.grpc_port = new.proc, new.http_port, new.grpc_port
        self.metrics_port, self.lines = new.metrics_port, new.lines

    def index(self) -> list[dict[str, Any]]:
        """POST /v2/repository/index: every version with its state."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return list(json.loads(resp.read()))

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus series' samples matching ``labels``, scraped now."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + "{", name + " "))
            and all(f'{k}="{v}"' in line for k, v in labels.items())
        )

    def close(self) -> None:
        """Fixture teardown: SIGTERM, and SIGKILL if it has not exited in 90 s."""
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_gateway(state_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Gateway:
    # Room for a second gateway's metrics port (the configs of the tests run up to two).
    http, grpc_, metrics = free_port(), free_port(), free_port_run(2)
    proc = subprocess.Popen(
        [
            GPUGATE,
            "serve",
            "--state-dir",
            str(state_dir),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_),
            "--metrics-port",
            str(metrics),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", **(env or {})},
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("gpugate ready"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError("gateway did not become ready:\n" + "".join(lines[-40:]))
    key_line = next(line for line in lines if "demo tenant key" in line)
    match = re.search(r"demo tenant key: (\S+)", key_line)
    assert match is not None
    return Gateway(proc, state_dir, http, grpc_, metrics, match.group(1), lines, args=extra)


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout_s: float = 180.0,
    every_s: float = 0.25,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; past
    ``timeout_s`` fail naming ``what`` (and ``explain()``'s account, if given)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every_s)
    extra = f"; {explain()}" if explain is not None else ""
    raise AssertionError(f"timed out waiting for {what}{extra}")


def admin_token(gw: Gateway) -> str:
    """The token of the admin user the first admin command created (STATE_DIR/admin.token)."""
    return (gw.state_dir / "admin.token").read_text().strip()


def admin(
    gw: Gateway, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    """One admin HTTP API call: (status, JSON body), errors included."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{gw.http_url}/admin{path}", data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def make_user(gw: Gateway, name: str, role: str) -> str:
    """A new user of ``role``, created by the admin through the CLI; returns its token."""
    made = gw.admin_cli("users", "create", name, "--role", role, "--json")
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["token"])


def register_digits(
    gw: Gateway, token: str, artifact: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``gpugate models register digits`` of a :func:`train_digits` artifact as the user of
    ``token`` (``--json``; ``extra`` options appended)."""
    return gw.admin_cli(
        "models",
        "register",
        "digits",
        "--artifact",
        str(artifact),
        "--format",
        "safetensors",
        "--class",
        "serving.demo:DigitsMLP",
        "--model-kwargs",
        '{"hidden": 128}',
        "--json",
        *extra,
        token=token,
    )


def train_digits(path: Path, seed: int, nan: bool = False) -> float:
    """A digits model trained like the demo but with another seed, saved as safetensors
    (``serving.demo:DigitsMLP``, hidden 128); returns its accuracy."""
    import safetensors.torch
    import torch

    from serving.demo.models import _train_digits

    model, info = _train_digits(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if nan:
        state["scale"] = torch.full_like(state["scale"], float("nan"))
    safetensors.torch.save_file(state, path)
    return float(info["accuracy"])


# The ``params`` of a fixture that runs a module's tests on SQLite and on PostgreSQL.
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextlib.contextmanager
def gateway_on(request: pytest.FixtureRequest, state: Path) -> Iterator[Gateway]:
    """A gateway on ``state``: its embedded SQLite database, or a fresh PostgreSQL schema
    when the fixture's param (:data:`DATABASES`) is ``postgres``."""
    with contextlib.ExitStack() as stack:
        extra: tuple[str, ...] = ()
        if request.param == "postgres":
            from tests import postgres

            server = request.getfixturevalue("postgres_server")
            extra = ("--database-url", stack.enter_context(postgres.fresh_schema(server.url)).url)
        gw = start_gateway(state, *extra)
        stack.callback(gw.close)
        yield gw


@contextlib.contextmanager
def configured_gateway(
    tmp_path_factory: pytest.TempPathFactory, name: str, config_text: str
) -> Iterator[Gateway]:
    """A gateway on a fresh state folder with ``config_text`` as its --config."""
    state = tmp_path_factory.mktemp(name)
    config = state.parent / f"{state.name}-config.yaml"
    config.write_text(config_text)
    gw = start_gateway(state, "--config", str(config))
    gw.config = config
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("state"))
    try:
        yield gw
    finally:
        gw.close()


# -- digits traffic ----------------------------------------------------------------

MARK = 101.0  # pixel 0 set to this (real pixels are 0..16) marks an input


@dataclass
class Outcome:
    at: float  # time.monotonic() when answered
    status: int
    version: str | None
    marked: bool
    user: str | None
    error: str = ""


@dataclass
class Traffic:
    """Threads sending unversioned requests for the demo digits model over keep-alive
    HTTP, recording every outcome and which version answered."""

    gw: Gateway
    threads: int = 4
    mark_share: float = 0.0  # share of inputs marked with MARK
    users: list[str] | None = None  # X-User values to draw from
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)
        ]

    def __enter__(self) -> Traffic:
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=60)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            marked = rng.random() < self.mark_share
            user = rng.choice(self.users) if self.users else None
            outcome = send(self.gw, marked, user, rng)
            with self._lock:
                self.outcomes.append(outcome)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    @property
    def failures(self) -> list[str]:
        return [f"{o.status} {o.error}" for o in self.snapshot() if o.status != 200]

    def count(self) -> Counter[str]:
        """Answers per version so far."""
        return Counter(o.version for o in self.snapshot() if o.version is not None)

    def wait_for_version(self, version: str, timeout_s: float = 120) -> float:
        """Seconds until every answer in a row of 20 comes from ``version``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            recent = [o.version for o in self.snapshot() if o.status == 200][-20:]
            if len(recent) == 20 and set(recent) == {version}:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"answers never switched to version {version}")


_conns = threading.local()


def send(
    gw: Gateway,
    marked: bool,
    user: str | None,
    rng: random.Random,
    version: str | None = None,
    key: str | None = None,
) -> Outcome:
    """One digits request with random pixels (pixel 0 = MARK if ``marked``), as the demo
    tenant or the tenant of ``key``."""
    pixels = [float(rng.randint(0, 16)) for _ in range(64)]
    if marked:
        pixels[0] = MARK
    body = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels}]}
    ).encode()
    headers = {"Authorization": f"Bearer {key or gw.demo_key}", "Content-Type": "application/json"}
    if user is not None:
        headers["X-User"] = user
    path = "/v2/models/digits" + (f"/versions/{version}" if version else "") + "/infer"
    conn = getattr(_conns, gw.http_url, None)
    try:
        if conn is None:
            host, port = gw.http_url.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            setattr(_conns, gw.http_url, conn)
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
    except Exception as exc:  # a reset or a timeout is a failed request too
        setattr(_conns, gw.http_url, None)
        return Outcome(time.monotonic(), 0, None, marked, user, repr(exc))
    if resp.status != 200:
        return Outcome(time.monotonic(), resp.status, None, marked, user, data[:300].decode())
    return Outcome(time.monotonic(), 200, json.loads(data)["model_version"], marked, user)
