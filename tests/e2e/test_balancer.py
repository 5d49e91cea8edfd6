"""Two gateways on two Ray nodes behind a real load balancer.

A Ray cluster on this machine (`ray start`: a head with the model replica, and two
gateway nodes on 127.0.0.2 and 127.0.0.3, each advertising one `gpugate_gateway`),
`server.host: node` so that each gateway binds its own node's address, and HAProxy in
front, health-checking `/v2/health/ready` on each. Under load through the balancer,
with clients that retry a 502/503 and a refused or reset connection: a gateway killed
with SIGKILL, a rolling restart of the gateways, and a model replica killed lose no
request, and the ledger has a row for every answer (and beyond them only rows of
requests whose answer the killed gateway never sent).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port, wait_for
from tests.e2e.test_cluster import (
    Cluster,
    Retrying,
    _deploy,
    _gateway_pids,
    cluster_env,
    ledger_matches,
    ray_start,
    ray_stop,
    replica_pids,
)

pytestmark = pytest.mark.timeout(900)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def _require_haproxy() -> None:
    if Path(HAPROXY).is_file():
        return
    why = "HAProxy is not installed (Debian: apt-get install haproxy)"
    if os.environ.get("GPUGATE_REQUIRE_HAPROXY"):
        pytest.fail(why)
    pytest.skip(why)


GATEWAY_NODES = ("127.0.0.2", "127.0.0.3")


@pytest.fixture(scope="module")
def gateway_nodes() -> Iterator[Cluster]:
    """A head (the control loop, the model replica) and two gateway nodes, on their own
    loopback addresses (Ray gives a head node the host's address whatever it is told)."""
    _require_haproxy()
    temp = Path(f"/tmp/gg-ray2-{os.getpid()}")
    port, dashboard, client = free_port(), free_port(), free_port()
    env = cluster_env()
    started = [
        ray_start(
            [
                "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}", "--num-cpus=2", f"--temp-dir={temp}",
            ],
            env,
        )
    ]  # fmt: skip
    try:
        for address in GATEWAY_NODES:
            started.append(
                ray_start(
                    [f"--address=127.0.0.1:{port}", f"--node-ip-address={address}",
                     "--num-cpus=0", '--resources={"gpugate_gateway": 1}'],
                    env,
                )
            )  # fmt: skip
        yield Cluster(
            started[0], f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, str(temp)
        )
    finally:
        for proc in reversed(started):
            ray_stop(proc)


HAPROXY_CONFIG = """
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    # Only what cannot have run: a request whose connection died after it was sent may
    # have been served and charged, so its retry is left to the client, which counts it.
    retry-on conn-failure 503
frontend gpugate
    bind 127.0.0.1:{front}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter 300ms fall 2 rise 2
    server gw1 127.0.0.2:{port} check
    server gw2 127.0.0.3:{port} check
"""


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """HAProxy on a free port in front of both gateways' HTTP port: (front, http)."""
    front, http_port = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, port=http_port))
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield front, http_port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=10) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _model_replica_pids(cluster: Cluster) -> list[int]:
    return replica_pids(cluster, b"ray::ServeReplica:gpugate-digits-1:model-digits-1")


def test_two_gateways_behind_haproxy_lose_no_request(
    gateway_nodes: Cluster, balancer: tuple[int, int], tmp_path: Path
) -> None:
    front, http_port = balancer
    grpc_port = free_port()
    config = tmp_path / "config.yaml"

    def write_config(extra: str = "") -> None:
        config.write_text(
            "server:\n  host: node\n"
            f"  http_port: {http_port}\n  grpc_port: {grpc_port}\n  metrics_port: 0\n"
            "  gateway_replicas: 2\n  gateway_resources: {gpugate_gateway: 1}\n" + extra
        )

    write_config()
    state = tmp_path / "state"
    done = _deploy(gateway_nodes, config, state)
    assert done.returncode == 0, done.stderr[-3000:]
    key = (state / "demo_tenant.key").read_text().strip()
    gateways = _gateway_pids(gateway_nodes)
    assert len(gateways) == 2, gateways
    for host in GATEWAY_NODES:  # each gateway on its own node's address
        assert _ready(host, http_port), host

    counts: dict[str, object] = {}
    with Retrying(front, key, retry_codes=frozenset({"502", "503"})) as load:
        time.sleep(2)
        # 1. SIGKILL one gateway: HAProxy marks it down, Serve starts another.
        victim = gateways[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            "a new gateway", lambda: len(set(_gateway_pids(gateway_nodes)) - {victim}) == 2, 120
        )
        time.sleep(2)
        counts["kill"] = dict(load.retries)
        # 2. A rolling restart of the gateways: deploy again with a changed config.
        write_config("  drain_timeout_s: 10\n")
        before = set(_gateway_pids(gateway_nodes))
        redeployed = _deploy(gateway_nodes, config, state)
        assert redeployed.returncode == 0, redeployed.stderr[-3000:]
        wait_for(
            "two new gateways",
            lambda: (
                set(_gateway_pids(gateway_nodes)).isdisjoint(before)
                and len(_gateway_pids(gateway_nodes)) == 2
            ),
            240,
        )
        time.sleep(2)
        counts["rolling"] = dict(load.retries)
        # 3. SIGKILL the model replica: Serve starts another.
        (replica,) = _model_replica_pids(gateway_nodes)
        os.kill(replica, signal.SIGKILL)
        wait_for(
            "a new model replica", lambda: set(_model_replica_pids(gateway_nodes)) - {replica}, 120
        )
        time.sleep(3)
    print(
        f"behind HAProxy: {load.answers} answered, {load.lost} lost; "
        f"client retries so far after each step {counts}, in all {dict(load.retries)}"
    )
    assert load.lost == 0, load
    assert load.answers > 0
    ledger_matches(front, key, load.answers, load.unsure)
