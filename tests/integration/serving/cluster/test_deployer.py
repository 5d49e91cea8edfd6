"""Live deploys on a real Ray Serve: replicas refuse changed bytes, and a version
that cannot be deployed leaves the serving one in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.cluster import runtime as cluster
from serving.cluster.deployer import Deployer, app_name
from serving.config.schema import GatewayConfig
from serving.dataplane import ClusterSecret
from serving.demo.models import ensure_demo_model
from serving.registry import Candidate, Registry, Signature, Stages, artifact_path
from serving.state import audit
from serving.state.db import model_versions, open_engine
from tests.integration.serving.registry.uploads import register_file, skip_smoke_tests

pytestmark = pytest.mark.timeout(600)


def test_a_version_whose_bytes_changed_is_refused_and_production_stays(
    ray_serve: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    skip_smoke_tests(monkeypatch)
    state = tmp_path / "state"
    demo = ensure_demo_model(state)
    engine = open_engine(None, state)
    registry = Registry(engine, state, GatewayConfig(models=[demo]))
    Stages(registry).adopt_config_models([demo], {})
    secret = ClusterSecret(b"integration-cluster-secret-0123456789")
    deployer = Deployer(registry, secret, heartbeat_s=1.0, deploy_timeout_s=120)
    try:
        first = deployer.prepare()
        assert [(m["config"]["version"], m["stage"]) for m in first] == [("1", "production")]

        v2 = register_file(
            registry,
            "alice",
            Candidate(
                name="digits",
                artifact=demo.artifact,
                format="safetensors",
                signature=Signature.of(demo),
                model_class=demo.model_class,
                model_kwargs=demo.model_kwargs,
                version="2",
            ),
        )
        # Not the same bytes as v1 any more: a copy under v2's digest, then corrupted.
        stored = artifact_path(state, v2.digest)
        with engine.begin() as conn:
            conn.execute(
                model_versions.update()
                .where(model_versions.c.version == "2")
                .values(digest="f" * 64)
            )
        bad = artifact_path(state, "f" * 64)
        bad.write_bytes(stored.read_bytes())
        os.chmod(bad, 0o644)
        with engine.begin() as conn:  # skip the CLI's own digest check: the replica's is tested
            conn.execute(
                model_versions.update()
                .where(model_versions.c.version == "1")
                .values(stage="archived")
            )
            conn.execute(
                model_versions.update()
                .where(model_versions.c.version == "2")
                .values(stage="production")
            )

        spec = deployer.prepare()
        assert [(m["config"]["version"], m["stage"]) for m in spec] == [("1", "production")]
        failed = [r for r in audit.read(engine) if r.action == "model.deploy_failed"]
        assert [r.target for r in failed] == ["model:digits:2"]
        assert "changed after registration" in failed[0].reason, failed[0].reason
        assert app_name("digits", "2") not in cluster.applications(cluster.APP_NAME + "-")
    finally:
        for app in cluster.applications(cluster.APP_NAME + "-digits-"):
            cluster.delete(app)
