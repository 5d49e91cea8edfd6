"""The data port of a real Serve replica: strangers are refused before any batch runs,
the gateway that proves the cluster secret is served, also by the replica Serve
starts in place of a killed one; and the replica is given no database URL."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray import serve

from scheduler import BackendUnavailableError
from serving.cluster.runtime import PRIVATE_ENV, batch_backend
from serving.dataplane import ClusterSecret
from serving.dataplane.auth import HELLO_SIZE, MAGIC, NONCE
from serving.dataplane.codec import encode_batch, frame
from serving.demo.models import ensure_demo_model
from serving.replica.deployment import model_deployment

pytestmark = pytest.mark.timeout(300)

SECRET = ClusterSecret(b"integration-cluster-secret-0123456789")
WRONG = ClusterSecret(b"not-the-cluster-secret-0123456789abc")


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _hello(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < HELLO_SIZE:
        chunk = sock.recv(HELLO_SIZE - len(data))
        assert chunk, "closed before the hello"
        data += chunk
    assert data.startswith(MAGIC)
    return data[len(MAGIC) :]


def _closed(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    finally:
        sock.close()
    return True


def _strings(value: Any) -> list[str]:
    """Every string inside a (nested) deployment argument."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def test_the_deployment_hands_the_replica_its_config_and_the_secret_only(
    tmp_path: Path,
) -> None:
    config = ensure_demo_model(tmp_path)
    bound = model_deployment(config, SECRET)._bound_deployment
    assert bound.init_kwargs == {}
    model, secret = bound.init_args
    assert model == config.model_dump(mode="json")
    assert isinstance(secret, ClusterSecret)
    text = " ".join(_strings(bound.init_args)) + repr(bound.ray_actor_options)
    for marker in ("database", "sqlite", "postgres", "gpugate.db", "state_dir"):
        assert marker not in text
    assert "runtime_env" not in bound.ray_actor_options  # no variables passed either
    # A local Ray's workers inherit the driver's environment: these leave it first.
    assert set(PRIVATE_ENV) == {"GPUGATE_DATABASE_URL", "GPUGATE_CLUSTER_SECRET"}
    # What Serve stores and ships is the pickled argument: the secret, not its repr.
    assert b"integration-cluster-secret" in pickle.dumps(secret)
    assert "integration" not in repr(bound.init_args)


def _replica_actor(app: str) -> Any:
    found = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]
    assert len(found) == 1, found
    return ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])


def test_strangers_are_refused_before_any_batch_and_the_gateway_is_served_after_a_restart(
    ray_serve: None, tmp_path: Path
) -> None:
    config = ensure_demo_model(tmp_path)
    handle = serve.run(model_deployment(config, SECRET), name="it-auth", route_prefix=None)
    node = ray.get_runtime_context().get_node_id()
    x = np.ones((2, 64), np.float32)
    try:
        address = handle.data_endpoint.remote(node).result(timeout_s=60)
        assert address.startswith("127.0.0.1:")  # the caller is on the replica's node

        raw = _connect(address)  # bytes that are no handshake at all
        raw.sendall(os.urandom(200))
        no_handshake = _connect(address)  # a valid batch frame, sent as before
        no_handshake.sendall(frame(encode_batch({"pixels": x})))
        wrong = _connect(address)  # the protocol, with another secret
        nonce = _hello(wrong)
        mine = os.urandom(NONCE)
        wrong.sendall(mine + WRONG.gateway_proof(address, nonce, mine))
        wrong.sendall(frame(encode_batch({"pixels": x})))
        started = time.monotonic()
        slow = _connect(address)  # says nothing: held only until the deadline
        for sock in (raw, no_handshake, wrong):
            assert _closed(sock, within_s=5)
        assert _closed(slow, within_s=10)
        assert time.monotonic() - started < 8
        stats = handle.data_stats.remote().result(timeout_s=30)
        assert stats == {"batches": 0, "admitted": 0, "refused": 4}

        async def served(backend: Any) -> int:
            result = await backend.run_batch({"pixels": x})
            return int(result.outputs["logits"].shape[0])

        async def with_wrong_secret() -> None:
            await batch_backend(handle, "direct", secret=WRONG).run_batch({"pixels": x})

        with pytest.raises(BackendUnavailableError):
            asyncio.run(with_wrong_secret())
        stats = handle.data_stats.remote().result(timeout_s=30)
        assert stats["batches"] == 0 and stats["refused"] == 5

        async def gateway() -> tuple[int, int, list[str], list[str]]:
            backend = batch_backend(handle, "direct", secret=SECRET)
            first = await served(backend)
            before = list(backend.addresses)  # type: ignore[attr-defined]
            ray.kill(_replica_actor("it-auth"))
            # Serve starts another replica; batches fail as unavailable until it is up.
            deadline = time.monotonic() + 120
            after_restart = 0
            while time.monotonic() < deadline:
                try:
                    after_restart = await served(backend)
                except BackendUnavailableError:
                    await asyncio.sleep(0.2)
                    continue
                if list(backend.addresses) != before:  # type: ignore[attr-defined]
                    break
            after = list(backend.addresses)  # type: ignore[attr-defined]
            await backend.close()
            return first, after_restart, before, after

        first, after_restart, before, after = asyncio.run(gateway())
        assert first == 2 and after_restart == 2
        assert len(after) == 1 and after != before  # the restarted replica's own port
        stats = handle.data_stats.remote().result(timeout_s=30)
        # The new replica admitted the gateway (its own secret came with the deployment).
        assert stats["admitted"] >= 1 and stats["batches"] >= 1 and stats["refused"] == 0
    finally:
        serve.delete("it-auth")
