"""gpugate on a running Ray cluster (`ray start --head` on this machine, its own temp
folder and ports): `gpugate deploy` returns and serving goes on without it; a
declarative redeploy (`serve deploy` of `gpugate config render`) and a gateway killed
with SIGKILL lose no request of a client that retries 503 / UNAVAILABLE and refused
or reset connections; the ledger has a row for every answer, and beyond them only rows
of requests whose answer a killed gateway never sent."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest

from tests.e2e.conftest import GPUGATE, free_port, wait_for

pytestmark = pytest.mark.timeout(900)

RAY = str(Path(GPUGATE).with_name("ray"))
SERVE = str(Path(GPUGATE).with_name("serve"))
BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
)


@dataclass
class Cluster:
    proc: subprocess.Popen[str]
    address: str
    dashboard: str
    env: dict[str, str]
    temp: str


CLUSTER_TOKEN = secrets.token_hex(32)  # this test session's clusters' auth token


def cluster_env() -> dict[str, str]:
    """The environment of `ray start` and of the cluster's clients: those of a cluster
    with token auth (Ray's default) name the mode and carry the cluster's token, as each
    node and client of a real cluster must (nothing is read from or written to
    ``~/.ray``)."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": CLUSTER_TOKEN,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def ray_start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """One Ray node (``ray start --block`` with ``args``), once it runs; its output is
    drained from then on, so the pipe never fills."""
    proc = subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ray runtime started" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    raise RuntimeError(f"ray start ended: {proc.wait()}")


def ray_stop(proc: subprocess.Popen[str]) -> None:
    """End the ``--block`` process, which stops what it started."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A one-node Ray cluster started like a real one (``ray start --head``)."""
    temp = Path(f"/tmp/gg-ray-{os.getpid()}")  # unix socket paths must stay short
    port, dashboard, client = free_port(), free_port(), free_port()
    env = cluster_env()
    proc = ray_start(
        [
            "--head", f"--port={port}", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", "--num-cpus=2", f"--temp-dir={temp}",
        ],
        env,
    )  # fmt: skip
    try:
        yield Cluster(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, str(temp))
    finally:
        ray_stop(proc)


@dataclass
class Retrying:
    """Clients that send one request at a time on a connection of its own, retrying a
    503 (``retry_codes``) or a refused/reset connection after 50 ms, as a client behind a
    balancer would; any other answer fails the test.

    ``unsure`` counts the tries that may have run without their answer arriving: the
    connection was lost after the request was sent (or a balancer said so, 502). A
    gateway commits a batch's ledger rows before its answers leave, so such a request may
    be charged, and its retry is charged again."""

    port: int
    key: str
    threads: int = 3
    retry_codes: frozenset[str] = frozenset({"503"})  # what else is retried: a failed connection
    answers: int = 0
    lost: int = 0  # requests that never got an answer in 30 s of retries
    unsure: int = 0  # tries that may have run, their answer lost (see above)
    retries: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Retrying:
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join()

    def _once(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(
                "POST",
                "/v2/models/digits/infer",
                BODY,
                {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            resp.read()
            return str(resp.status)
        except OSError as exc:
            return type(exc).__name__
        finally:
            conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            give_up = time.monotonic() + 30
            while True:
                outcome = self._once()
                if outcome == "200":
                    with self._lock:
                        self.answers += 1
                    break
                assert outcome in self.retry_codes or not outcome.isdigit(), outcome
                with self._lock:
                    self.retries[outcome] += 1
                    if outcome not in ("503", "ConnectionRefusedError"):
                        self.unsure += 1
                if time.monotonic() > give_up:
                    with self._lock:
                        self.lost += 1
                    break
                time.sleep(0.05)
            time.sleep(0.01)


def _deploy(cluster: Cluster, config: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            GPUGATE,
            "deploy",
            "--address",
            cluster.address,
            "--config",
            str(config),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=cluster.env,
        check=False,
    )


def _processes() -> Iterator[tuple[int, bytes]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes()
            except OSError:
                continue


def _gateway_pids(cluster: Cluster) -> list[int]:
    return replica_pids(cluster, b"ray::ServeReplica:gpugate:gateway")


def replica_pids(cluster: Cluster, title: bytes) -> list[int]:
    """This cluster's Serve replicas whose process title starts with ``title``: their
    raylet is one of this cluster's (its temp folder is in the raylet's command line)."""
    raylets = {
        str(pid).encode()
        for pid, cmdline in _processes()
        if b"/raylet" in cmdline.split(b"\0")[0] and cluster.temp.encode() in cmdline
    }
    found = []
    for pid, cmdline in _processes():
        if not cmdline.startswith(title):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"RAY_RAYLET_PID=") and v[15:] in raylets for v in environ):
            found.append(pid)
    return found


def ledger_matches(port: int, key: str, answered: int, unsure: int) -> None:
    """Every answer has its ledger row, and the only rows beyond them are of tries whose
    answer was lost (at most ``unsure``)."""
    seen: list[int] = []

    def covered() -> bool:
        seen.append(_usage_requests(port, key))
        return answered <= seen[-1] <= answered + unsure

    wait_for(
        "the ledger",
        covered,
        30,
        explain=lambda: f"ledger {seen[-1]} requests, {answered} answered, {unsure} unsure",
    )
    print(f"ledger: {seen[-1]} requests for {answered} answers and {unsure} unsure tries")


def _usage_requests(port: int, key: str) -> int:
    today = date.today().isoformat()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/usage?from={today}&to={today}",
        headers={"Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return int(json.loads(resp.read())["totals"]["requests"])


def test_serving_outlives_the_deployer_and_loses_nothing_on_redeploy_and_kill(
    cluster: Cluster, tmp_path: Path
) -> None:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"server:\n  http_port: {http_port}\n  grpc_port: {grpc_port}\n"
        f"  metrics_port: {metrics_port}\n  gateway_replicas: 2\n"
    )
    state = tmp_path / "state"
    started = time.monotonic()
    done = _deploy(cluster, config, state)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"gpugate deploy returned after {time.monotonic() - started:.1f}s")
    key = (state / "demo_tenant.key").read_text().strip()

    # The deployer has exited: the cluster serves on its own.
    with Retrying(http_port, key) as quiet:
        time.sleep(3)
    assert quiet.answers > 0 and quiet.lost == 0 and not quiet.retries, quiet

    # A declarative redeploy of the same application: every replica is replaced.
    rendered = tmp_path / "serve.yaml"
    made = subprocess.run(
        [
            GPUGATE,
            "config",
            "render",
            "--config",
            str(config),
            "--state-dir",
            str(state),
            "-o",
            str(rendered),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    with Retrying(http_port, key) as redeploy:
        time.sleep(1)
        applied = subprocess.run(
            [SERVE, "deploy", str(rendered), "-a", cluster.dashboard],
            capture_output=True,
            text=True,
            timeout=300,
            env=cluster.env,
            check=False,
        )
        assert applied.returncode == 0, applied.stderr[-3000:]
        before = set(_gateway_pids(cluster))
        assert len(before) == 2, before
        # Until both gateways are new ones, and a little after.
        wait_for(
            "two new gateways, serving",
            lambda: (
                set(_gateway_pids(cluster)).isdisjoint(before) and len(_gateway_pids(cluster)) == 2
            ),
            240,
        )
        time.sleep(3)
    print(f"redeploy: {redeploy.answers} answered, retried {dict(redeploy.retries)}")
    assert redeploy.lost == 0, redeploy
    assert redeploy.answers > 0

    # SIGKILL one gateway under load: Serve starts another; retrying clients lose nothing.
    with Retrying(http_port, key) as killed:
        time.sleep(1)
        victim = _gateway_pids(cluster)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for("a new gateway", lambda: len(set(_gateway_pids(cluster)) - {victim}) == 2, 120)
        time.sleep(3)
    print(f"gateway killed: {killed.answers} answered, retried {dict(killed.retries)}")
    assert killed.lost == 0, killed

    answered = quiet.answers + redeploy.answers + killed.answers
    unsure = quiet.unsure + redeploy.unsure + killed.unsure
    # Every answer has its ledger row, whichever gateway gave it (or died after).
    ledger_matches(http_port, key, answered, unsure)
