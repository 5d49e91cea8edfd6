"""Registry, guardrails, approvals and stages against a SQLite file and PostgreSQL."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest
import safetensors.torch
import sqlalchemy as sa
import torch

from serving.config.schema import GatewayConfig, MetricPolicy, ModelPolicy, TensorConfig
from serving.demo.models import DigitsMLP
from serving.registry import (
    ApprovalError,
    Candidate,
    GuardrailRefused,
    Registry,
    RegistryError,
    Signature,
    StageError,
    Stages,
    VersionExistsError,
    VersionNotFoundError,
    artifact_path,
)
from serving.state import audit
from tests.integration.conftest import OpenEngine
from tests.integration.serving.registry.uploads import register_file, skip_smoke_tests

SIG = Signature(
    (TensorConfig(name="pixels", datatype="FP32", shape=[64]),),
    (TensorConfig(name="logits", datatype="FP32", shape=[10]),),
)
CONFIG = GatewayConfig(
    policies={
        "digits": ModelPolicy(
            required_approvals=2,
            metrics={"accuracy": MetricPolicy(max_regression=0.01)},
            max_artifact_bytes=10 * 2**20,
        )
    }
)


def weights(path: Path, seed: int, nan: bool = False) -> Path:
    torch.manual_seed(seed)
    state = DigitsMLP(16).state_dict()
    if nan:
        state["scale"] = torch.full_like(state["scale"], float("nan"))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def cand(artifact: Path, **kw: object) -> Candidate:
    fields: dict[str, object] = {
        "name": "digits",
        "artifact": artifact,
        "format": "safetensors",
        "signature": SIG,
        "model_class": "serving.demo:DigitsMLP",
        "model_kwargs": {"hidden": 16},
        "metrics": {"accuracy": 0.95},
    }
    fields.update(kw)
    return Candidate(**fields)  # type: ignore[arg-type]


@pytest.fixture
def reg(open_db: OpenEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A registry whose smoke test only records what it was asked to check."""
    skip_smoke_tests(monkeypatch)
    return Registry(open_db(), tmp_path / "state", CONFIG)


def stored_files(reg: Registry) -> list[str]:
    """Every file of the artifact store, temporary ones included."""
    folder = reg.state_dir / "artifacts" / "sha256"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def actions(reg: Registry) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.target) for r in audit.read(reg.engine)]


def test_register_stores_content_addressed_and_records_lineage(
    reg: Registry, tmp_path: Path
) -> None:
    src = weights(tmp_path / "a.safetensors", 1)
    v1 = register_file(
        reg, "dora", cand(src, source_uri="mlflow://run/1", dataset_digest="sha256:d")
    )
    assert (v1.version, v1.stage, v1.author) == ("1", "registered", "dora")
    stored = artifact_path(reg.state_dir, v1.digest)
    assert stored.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    v2 = register_file(
        reg,
        "dora",
        cand(weights(tmp_path / "b.safetensors", 2), parent_version="1", signature=None),
    )
    assert v2.version == "2" and v2.signature == SIG  # inherited from the parent
    v3 = register_file(reg, "dora", cand(src, parent_version="2", version="exp-3"))
    assert v3.digest == v1.digest  # same bytes, one stored copy
    assert [r.version for r in reg.lineage("digits", "exp-3")] == ["exp-3", "2", "1"]
    assert reg.children("digits") == {"1": ["2"], "2": ["exp-3"]}
    with pytest.raises(VersionExistsError, match="immutable"):
        register_file(reg, "dora", cand(src, version="exp-3"))
    with pytest.raises(RegistryError, match="no registered version '9'"):
        register_file(reg, "dora", cand(src, parent_version="9"))
    assert reg.get("digits", "1").as_json()["lineage"]["source_uri"] == "mlflow://run/1"
    assert actions(reg) == [
        ("dora", "model.register", f"model:digits:{v}") for v in ("1", "2", "exp-3")
    ]
    assert audit.verify(reg.engine).ok


def test_payload_and_size_guardrails_refuse_and_audit(reg: Registry, tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(DigitsMLP(16).state_dict(), pickled)
    with pytest.raises(GuardrailRefused, match=r"payload.*zip archive, not safetensors"):
        register_file(reg, "dora", cand(pickled))
    with pytest.raises(GuardrailRefused, match=r"payload.*not TorchScript"):
        register_file(reg, "dora", cand(pickled, format="torchscript"))
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.")
    with pytest.raises(GuardrailRefused, match="is a Python pickle"):
        register_file(reg, "dora", cand(raw))
    with pytest.raises(GuardrailRefused, match="format"):
        register_file(reg, "dora", cand(pickled, format="onnx"))
    big = tmp_path / "big.safetensors"
    with big.open("wb") as f:
        f.truncate(11 * 2**20)
    with pytest.raises(GuardrailRefused, match="size"):
        register_file(reg, "dora", cand(big))
    refused = audit.read(reg.engine)
    assert [r.action for r in refused] == ["model.refused"] * 5
    assert "zip archive" in refused[0].reason and refused[0].after["check"] == "payload"
    assert reg.list() == []
    assert stored_files(reg) == []  # neither the refused bytes nor a temporary file


def test_signature_and_metric_guardrails_compare_with_production(
    reg: Registry, tmp_path: Path
) -> None:
    src = weights(tmp_path / "a.safetensors", 1)
    stages = Stages(reg)
    register_file(reg, "dora", cand(src, metrics={"accuracy": 0.95}))
    stages.set_config_production("digits", "1")
    narrow = Signature((TensorConfig(name="pixels", datatype="FP32", shape=[32]),), SIG.outputs)
    with pytest.raises(GuardrailRefused, match=r"input 'pixels' has shape \[32\]"):
        register_file(reg, "dora", cand(src, signature=narrow))
    other_dtype = Signature(
        (TensorConfig(name="pixels", datatype="FP64", shape=[64]),), SIG.outputs
    )
    with pytest.raises(GuardrailRefused, match="FP64"):
        register_file(reg, "dora", cand(src, signature=other_dtype))
    no_out = Signature(SIG.inputs, (TensorConfig(name="probs", datatype="FP32", shape=[10]),))
    with pytest.raises(GuardrailRefused, match=r"outputs \['logits'\] of production"):
        register_file(reg, "dora", cand(src, signature=no_out))
    variable = Signature((TensorConfig(name="pixels", datatype="FP32", shape=[-1]),), SIG.outputs)
    assert register_file(reg, "dora", cand(src, signature=variable)).version == "2"
    with pytest.raises(GuardrailRefused, match=r"accuracy 0.93 is worse .* by 0.02"):
        register_file(reg, "dora", cand(src, metrics={"accuracy": 0.93}))
    with pytest.raises(GuardrailRefused, match="no 'accuracy' metric"):
        register_file(reg, "dora", cand(src, metrics={}))
    assert register_file(reg, "dora", cand(src, metrics={"accuracy": 0.945})).version == "3"


def test_smoke_test_loads_in_a_child_process(open_db: OpenEngine, tmp_path: Path) -> None:
    reg = Registry(open_db(), tmp_path / "state", CONFIG)
    good = register_file(reg, "dora", cand(weights(tmp_path / "a.safetensors", 1)))
    assert good.version == "1"
    with pytest.raises(GuardrailRefused, match=r"smoke-test.*NaN/Inf"):
        register_file(reg, "dora", cand(weights(tmp_path / "n.safetensors", 1, nan=True)))
    with pytest.raises(GuardrailRefused, match=r"smoke-test.*cannot construct"):
        register_file(
            reg,
            "dora",
            cand(weights(tmp_path / "b.safetensors", 1), model_kwargs={"hidden": 16, "bogus": 1}),
        )


def test_approvals_need_distinct_approvers_never_the_author(reg: Registry, tmp_path: Path) -> None:
    stages = Stages(reg)
    register_file(reg, "dora", cand(weights(tmp_path / "a.safetensors", 1)))
    with pytest.raises(ApprovalError, match="author"):
        stages.decide("dora", "digits", "1", "approve", "looks good to me")
    with pytest.raises(ApprovalError, match="reason"):
        stages.decide("ann", "digits", "1", "approve", " ")
    assert stages.decide("ann", "digits", "1", "approve", "eval ok").stage == "registered"
    with pytest.raises(ApprovalError, match="already decided"):
        stages.decide("ann", "digits", "1", "approve", "again")
    with pytest.raises(StageError, match="only a version that is approved"):
        stages.promote("dora", "digits", "1", "staging")
    assert stages.decide("bert", "digits", "1", "approve", "canary ok").stage == "approved"
    assert [a["approver"] for a in stages.approvals("digits", "1")] == ["ann", "bert"]
    register_file(reg, "dora", cand(weights(tmp_path / "b.safetensors", 2)))
    assert stages.decide("ann", "digits", "2", "reject", "drift").stage == "rejected"
    with pytest.raises(ApprovalError, match="is rejected"):
        stages.decide("bert", "digits", "2", "approve", "late")
    acts = [(a, t) for (_, a, t) in actions(reg)]
    assert ("model.refused", "model:digits:1") in acts
    assert ("model.approve", "model:digits:1") in acts and (
        "model.reject",
        "model:digits:2",
    ) in acts
    assert audit.verify(reg.engine).ok


def approved(reg: Registry, src: Path, **kw: object) -> str:
    v = register_file(reg, "dora", cand(src, **kw)).version
    for who in ("ann", "bert"):
        Stages(reg).decide(who, "digits", v, "approve", "ok")
    return v


def test_stages_promotion_and_rollback(reg: Registry, tmp_path: Path) -> None:
    stages = Stages(reg)
    v1 = approved(reg, weights(tmp_path / "a.safetensors", 1))
    with pytest.raises(StageError, match="staging"):
        stages.promote("dora", "digits", v1, "production")
    stages.promote("dora", "digits", v1, "staging")
    assert stages.promote("dora", "digits", v1, "production").stage == "production"
    v2 = approved(reg, weights(tmp_path / "b.safetensors", 2), metrics={"accuracy": 0.96})
    stages.promote("dora", "digits", v2, "staging")
    stages.promote("dora", "digits", v2, "production")
    assert reg.get("digits", v1).stage == "archived"
    v3 = approved(reg, weights(tmp_path / "c.safetensors", 3), metrics={"accuracy": 0.96})
    stages.promote("dora", "digits", v3, "staging")
    stages.promote("dora", "digits", v3, "production")
    assert stages.rollback("dora", "digits", "latency").version == v2
    assert stages.rollback("dora", "digits").version == v1  # further back, no toggling
    with pytest.raises(StageError, match="no earlier production"):
        stages.rollback("dora", "digits")
    assert [(v.version, v.stage) for v in reg.list("digits")] == [
        ("1", "production"),
        ("2", "archived"),
        ("3", "archived"),
    ]
    # An archived version can be staged again (and its guardrails re-run).
    stages.promote("dora", "digits", v3, "staging")
    assert audit.verify(reg.engine).ok


def test_rollback_of_a_model_never_registered_is_not_found(reg: Registry) -> None:
    """Not found, and not audited: there is nothing to refuse. A name no model can
    have (over 128 characters) used to fail the refusal's audit record on PostgreSQL
    (target is VARCHAR(300)), a 500 from the admin API."""
    stages = Stages(reg)
    records = len(audit.read(reg.engine))
    for name in ("nope", "x" * 3000):
        with pytest.raises(VersionNotFoundError, match="is registered"):
            stages.rollback("dora", name, "drill")
    assert len(audit.read(reg.engine)) == records


def test_promotion_rechecks_the_stored_bytes(reg: Registry, tmp_path: Path) -> None:
    v1 = approved(reg, weights(tmp_path / "a.safetensors", 1))
    stored = artifact_path(reg.state_dir, reg.get("digits", v1).digest)
    os.chmod(stored, 0o644)
    with stored.open("r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(GuardrailRefused, match=r"digest.*changed after registration"):
        Stages(reg).promote("dora", "digits", v1, "staging")
    assert reg.get("digits", v1).stage == "approved"
    last = audit.read(reg.engine)[-1]
    assert (last.action, last.after["check"]) == ("model.refused", "digest")


def test_config_versions_register_once_and_are_immutable(reg: Registry, tmp_path: Path) -> None:
    from serving.config.schema import ModelConfig

    src = weights(tmp_path / "a.safetensors", 1)
    model = ModelConfig(
        name="digits",
        version="7",
        artifact=src,
        format="safetensors",
        model_class="serving.demo:DigitsMLP",
        model_kwargs={"hidden": 16},
        inputs=list(SIG.inputs),
        outputs=list(SIG.outputs),
    )
    Stages(reg).adopt_config_models([model], {"digits:7": {"accuracy": 0.9}})
    Stages(reg).adopt_config_models([model], {})  # a restart changes nothing
    row = reg.get("digits", "7")
    assert (row.author, row.stage, row.metrics) == ("config", "production", {"accuracy": 0.9})
    assert reg.model_config(row).sha256 == row.digest
    weights(src, 2)
    with pytest.raises(RegistryError, match="changed since it was registered"):
        Stages(reg).adopt_config_models([model], {})


@pytest.mark.parametrize(
    ("registered", "field"),
    [
        ({}, "author"),  # the same bytes and fields, but not written by the config
        ({"model_class": "serving.demo.models:DigitsMLP"}, "author"),
        ({"model_kwargs": {"hidden": 16, "scale": 2}}, "author"),
    ],
)
def test_a_config_version_registered_first_by_someone_else_stops_the_start(
    reg: Registry, tmp_path: Path, registered: dict[str, object], field: str
) -> None:
    """A deployer who registers the config's name:version first (same artifact bytes, other
    fields) must not have their row promoted to production by the next start."""
    from serving.config.schema import ModelConfig

    src = weights(tmp_path / "a.safetensors", 1)
    register_file(reg, "mallory", cand(src, version="7", **registered))
    model = ModelConfig(
        name="digits",
        version="7",
        artifact=src,
        format="safetensors",
        model_class="serving.demo:DigitsMLP",
        model_kwargs={"hidden": 16},
        inputs=list(SIG.inputs),
        outputs=list(SIG.outputs),
    )
    with pytest.raises(RegistryError, match=f"digits:7: the registry's row has {field}="):
        Stages(reg).adopt_config_models([model], {})
    assert reg.get("digits", "7").stage == "registered"
    assert reg.production("digits") is None


def test_a_config_row_that_differs_in_a_declared_field_names_it(
    reg: Registry, tmp_path: Path
) -> None:
    from serving.config.schema import ModelConfig

    src = weights(tmp_path / "a.safetensors", 1)
    model = ModelConfig(
        name="digits",
        version="7",
        artifact=src,
        format="safetensors",
        model_class="serving.demo:DigitsMLP",
        model_kwargs={"hidden": 16},
        inputs=list(SIG.inputs),
        outputs=list(SIG.outputs),
    )
    Stages(reg).adopt_config_models([model], {})
    changed = model.model_copy(update={"model_class": "serving.demo.models:DigitsMLP"})
    with pytest.raises(
        RegistryError, match=re.escape("has model_class='serving.demo:DigitsMLP' where")
    ):
        Stages(reg).adopt_config_models([changed], {})
    named = [TensorConfig(name="scores", datatype="FP32", shape=[10])]
    with pytest.raises(RegistryError, match="has signature="):
        Stages(reg).adopt_config_models([model.model_copy(update={"outputs": named})], {})


def test_concurrent_registrations_get_distinct_versions(
    open_db: OpenEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    skip_smoke_tests(monkeypatch)
    src = weights(tmp_path / "a.safetensors", 1)
    regs = [Registry(open_db(), tmp_path / "state", CONFIG) for _ in range(3)]
    versions: list[str] = []
    errors: list[BaseException] = []

    def go(r: Registry) -> None:
        try:
            for _ in range(3):
                versions.append(register_file(r, "dora", cand(src)).version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions, key=int) == [str(i) for i in range(1, 10)]
    assert audit.verify(regs[0].engine).ok
    with regs[0].engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM model_versions")).scalar() == 9


def test_opening_the_store_sweeps_uploads_abandoned_an_hour_ago(
    reg: Registry, tmp_path: Path
) -> None:
    v1 = register_file(reg, "dora", cand(weights(tmp_path / "a.safetensors", 1)))
    folder = reg.state_dir / "artifacts" / "sha256"
    stale, fresh = folder / ".incoming.1.dead", folder / ".incoming.2.live"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    Registry(reg.engine, reg.state_dir, CONFIG)
    assert stored_files(reg) == sorted([fresh.name, v1.digest])
