"""The direct data plane (server.replica_transport: direct) against real Serve replicas:
batches bypass Serve's request path, but a replica Serve kills or restarts is noticed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray import serve

from scheduler import BackendUnavailableError
from serving.cluster.runtime import batch_backend
from serving.dataplane import ClusterSecret
from serving.dataplane.client import DirectBatchBackend
from serving.demo.models import ensure_demo_model
from serving.replica.deployment import model_deployment
from serving.replica.runner import ModelRunner

pytestmark = pytest.mark.timeout(300)

SECRET = ClusterSecret(b"integration-cluster-secret-0123456789")


def _replica_actor(app: str) -> ray.actor.ActorHandle:
    found = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]
    assert len(found) == 1, found
    return ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])


def test_a_killed_replica_fails_its_batches_as_unavailable_then_the_restarted_one_serves(
    ray_serve: None, tmp_path: Path
) -> None:
    config = ensure_demo_model(tmp_path)
    handle = serve.run(model_deployment(config, SECRET), name="it-direct", route_prefix=None)
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    want, _ = ModelRunner(config, num_threads=1).run({"pixels": x})

    async def main() -> tuple[list[BaseException], int, list[str], list[str]]:
        backend = batch_backend(handle, "direct", secret=SECRET)
        assert isinstance(backend, DirectBatchBackend)
        first = await backend.run_batch({"pixels": x})
        np.testing.assert_allclose(first.outputs["logits"], want["logits"], rtol=1e-5)
        before = backend.addresses
        # Loopback: the replica is on the caller's Ray node.
        assert len(before) == 1 and before[0].startswith("127.0.0.1:")
        replica = _replica_actor("it-direct")
        failures: list[BaseException] = []
        answered_after_kill = 0
        kill_sent = False
        killed = asyncio.Event()  # set once a batch has failed: the old replica is gone
        stop = asyncio.Event()

        async def client() -> None:
            nonlocal answered_after_kill
            while not stop.is_set():
                try:
                    result = await backend.run_batch({"pixels": x})
                except Exception as exc:
                    failures.append(exc)
                    if kill_sent:
                        killed.set()
                    await asyncio.sleep(0.05)  # as a client backs off on a 503
                else:
                    np.testing.assert_allclose(result.outputs["logits"], want["logits"], rtol=1e-5)
                    assert result.device_ns > 0
                    answered_after_kill += killed.is_set()

        # Closed-loop clients: batches are always on the connection when the kill lands.
        clients = [asyncio.create_task(client()) for _ in range(8)]
        await asyncio.sleep(0.5)
        ray.kill(replica)
        # ray.kill returns before the process is gone: answers that arrive meanwhile are
        # the old replica's, so count only those after the first failure.
        kill_sent = True
        deadline = asyncio.get_running_loop().time() + 60
        while answered_after_kill < 20 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)
        after = backend.addresses
        await backend.close()
        return failures, answered_after_kill, before, after

    try:
        failures, answered_after_kill, before, after = asyncio.run(main())
        # Batches in flight on the killed replica's connection fail, and only as
        # retryable unavailability (503), never as a model error.
        assert failures
        assert all(isinstance(f, BackendUnavailableError) for f in failures), failures[:3]
        # Serve restarted the replica; the backend found its new address and it serves.
        assert answered_after_kill >= 20
        assert len(after) == 1 and after != before
    finally:
        serve.delete("it-direct")


def test_batches_spread_over_replicas_and_one_killed_is_retried_on_the_other(
    ray_serve: None, tmp_path: Path
) -> None:
    config = ensure_demo_model(tmp_path).model_copy(update={"replicas": 2, "num_cpus": 0.5})
    handle = serve.run(model_deployment(config, SECRET), name="it-direct2", route_prefix=None)
    x = np.ones((2, 64), np.float32)

    async def main() -> tuple[list[str], list[BaseException], int]:
        backend = batch_backend(handle, "direct", replicas=2, secret=SECRET)
        assert isinstance(backend, DirectBatchBackend)
        # The first discovery round may find one replica; the backend asks again while
        # it knows fewer than the version has.
        until = time.monotonic() + 15
        while len(backend.addresses) < 2 and time.monotonic() < until:
            await asyncio.gather(*(backend.run_batch({"pixels": x}) for _ in range(4)))
        both = backend.addresses
        victim = next(
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::it-direct2#")
        )
        stop = asyncio.Event()
        errors: list[BaseException] = []
        served = 0

        async def client() -> None:
            nonlocal served
            while not stop.is_set():
                try:
                    await backend.run_batch({"pixels": x})
                    served += 1
                except Exception as exc:
                    errors.append(exc)

        clients = [asyncio.create_task(client()) for _ in range(8)]
        await asyncio.sleep(0.5)
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*clients)
        await backend.close()
        return both, errors, served

    try:
        both, errors, served = asyncio.run(main())
        assert len(both) == 2  # discovery found both replicas, batches went to both
        # Batches caught on the killed replica were retried on the live one.
        assert not errors, errors[:3]
        assert served > 50
    finally:
        serve.delete("it-direct2")
