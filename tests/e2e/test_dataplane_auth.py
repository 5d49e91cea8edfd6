"""A real ``gpugate serve`` on PostgreSQL given its database URL and cluster secret in the
environment: inference works through the authenticated data plane, the model replica's
process holds neither credential, its data port (on loopback) refuses a stranger, and
the driver keeps the replica's reservation row."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from serving.dataplane.auth import HELLO_SIZE, MAGIC
from serving.dataplane.codec import encode_batch, frame
from tests.e2e.conftest import start_gateway
from tests.postgres import Schema

pytestmark = [pytest.mark.timeout(600), pytest.mark.postgres]

SECRET = "e2e-cluster-secret-" + "0123456789abcdef" * 2


def _parent(pid: int) -> int:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


def _replica_pids(root: int) -> list[int]:
    """The model replicas started under ``root`` (the gateway's `gpugate serve`), not
    those of any other gateway running on the machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ServeReplica:gpugate-digits-1:model-digits-1" not in cmdline:
            continue
        pid = ancestor = int(entry.name)
        while ancestor > 1 and ancestor != root:
            ancestor = _parent(ancestor)
        if ancestor == root:
            pids.append(pid)
    return pids


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (its socket inodes, matched in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes and local.startswith("0100007F:"):  # LISTEN
            ports.add(int(local.split(":")[1], 16))
    return ports


def test_replicas_hold_no_credentials_and_their_data_port_refuses_strangers(
    tmp_path: Path, postgres_schema: Schema
) -> None:
    url = postgres_schema.url
    gw = start_gateway(
        tmp_path / "state",
        env={"GPUGATE_DATABASE_URL": url, "GPUGATE_CLUSTER_SECRET": SECRET},
    )
    try:
        body = json.dumps(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
        ).encode()
        req = urllib.request.Request(
            f"http://{gw.http_url}/v2/models/digits/infer",
            data=body,
            headers={"Authorization": f"Bearer {gw.demo_key}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["outputs"][0]["shape"] == [1, 10]

        # The secret came from the environment: no file was made in the state folder.
        assert not (tmp_path / "state" / "cluster.secret").exists()

        [pid] = _replica_pids(gw.proc.pid)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"GPUGATE_DATABASE_URL" not in environ
        assert b"GPUGATE_CLUSTER_SECRET" not in environ
        assert url.encode() not in environ and SECRET.encode() not in environ

        # Its data port is on loopback (the gateway is on its node) and wants the
        # handshake: a batch sent without one is reset unanswered.
        ports = _listening_ports(pid)
        assert ports, "the replica opened no loopback port"
        for port in ports:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                hello = b""
                while len(hello) < HELLO_SIZE and (chunk := sock.recv(HELLO_SIZE)):
                    hello += chunk
                if not hello.startswith(MAGIC):
                    continue  # another of the worker's ports (Ray's own)
                sock.sendall(frame(encode_batch({"pixels": np.zeros((1, 64), np.float32)})))
                sock.settimeout(10)
                try:
                    rest = sock.recv(65536)
                except ConnectionResetError:
                    rest = b""
                assert rest == b""  # closed, no answer frame
                break
        else:
            pytest.fail(f"no data-plane port among {ports}")

        # The driver, not the replica, wrote the replica's reservation.
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text("SELECT replica, device, ended_at FROM ledger_reservations")
                ).all()
        finally:
            engine.dispose()
        assert [(r.device, r.ended_at) for r in rows] == [("cpu", None)]
        assert rows[0].replica.startswith("model-digits-1:")
        assert gw.stop() == 0
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                ended = conn.execute(sa.text("SELECT ended_at FROM ledger_reservations")).all()
        finally:
            engine.dispose()
        assert [e.ended_at is not None for e in ended] == [True]  # ended at shutdown
    finally:
        gw.close()
