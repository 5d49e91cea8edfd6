"""The smoke test's child process, with real processes: what it sees of the gateway's
environment, and the limits and the timeout that bound it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from serving.config import ModelConfig, ModelPolicy, TensorConfig
from serving.registry import GuardrailRefused
from serving.registry.guardrails import SmokeLimits, smoke_test
from tests.unit.serving.registry.smoke_spies import REPORT

ROOT = Path(__file__).resolve().parents[4]
SPIES = "tests.unit.serving.registry.smoke_spies"
SECRET = "s3cr3t-value-of-the-gateway"
# What the child's environment may hold when it starts.
ALLOWED = {
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "PYTHONPATH",
}


@pytest.fixture
def spies_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the child import this test package, as a gateway's PYTHONPATH would."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def spy(tmp_path: Path, cls: str, **kwargs: Any) -> ModelConfig:
    artifact = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1)}, artifact)
    return ModelConfig(
        name="spy",
        artifact=artifact,
        format="safetensors",
        model_class=f"{SPIES}:{cls}",
        model_kwargs=kwargs,
        inputs=[TensorConfig(name="x", datatype="FP32", shape=[1])],
        outputs=[TensorConfig(name="y", datatype="FP32", shape=[1])],
    )


def refusal(config: ModelConfig, policy: ModelPolicy, limits: SmokeLimits) -> str:
    with pytest.raises(GuardrailRefused) as refused:
        smoke_test(config, policy, limits)
    assert refused.value.check == "smoke-test"
    return refused.value.reason


def report(reason: str) -> Any:
    assert REPORT in reason, reason
    return json.loads(reason.split(REPORT, 1)[1])


@pytest.mark.usefixtures("spies_importable")
def test_the_child_sees_none_of_the_gateways_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "GPUGATE_DATABASE_URL",
        "GPUGATE_AUDIT_KEY",
        "GPUGATE_ADMIN_TOKEN",
        "TENANT_API_KEY",
        "GPUGATE_TENANT_ACME_KEY",
        "DATABASE_URL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "AWS_SECRET_ACCESS_KEY",
    ):
        monkeypatch.setenv(name, SECRET)
    policy = ModelPolicy(smoke_timeout_s=120)
    seen = report(refusal(spy(tmp_path, "EnvSpy", secret=SECRET), policy, SmokeLimits()))
    assert set(seen["started"]) <= ALLOWED, seen["started"]
    assert not any(n.startswith("GPUGATE_") or n.endswith("_KEY") for n in seen["env"])
    assert seen["secret_seen"] is False
    assert seen["stdin"] == ""
    work = Path(seen["cwd"])
    assert seen["home"] == str(work) and work.name.startswith("gpugate-smoke-")
    assert not work.exists()  # removed afterwards
    assert tmp_path not in work.parents and Path.cwd() != work


@pytest.mark.usefixtures("spies_importable")
def test_the_child_runs_under_resource_limits(tmp_path: Path) -> None:
    limits = SmokeLimits(memory_bytes=3 * 2**30, open_files=32, file_bytes=2**20)
    config = spy(tmp_path, "EnvSpy", secret=SECRET)
    size = config.artifact.stat().st_size
    seen = report(refusal(config, ModelPolicy(smoke_timeout_s=100), limits))["limits"]
    assert seen["RLIMIT_AS"] == [3 * 2**30 + 3 * size] * 2
    assert seen["RLIMIT_NOFILE"] == [32, 32]
    assert seen["RLIMIT_FSIZE"] == [2**20, 2**20]
    assert seen["RLIMIT_CORE"] == [0, 0]
    cpu, hard = seen["RLIMIT_CPU"]
    assert cpu == hard and 100 < cpu < 100 + 60  # the timeout, after what startup took


@pytest.mark.usefixtures("spies_importable")
def test_an_allocation_over_the_memory_limit_is_refused_not_granted(tmp_path: Path) -> None:
    # 2 GiB of untouched address space: granted on any machine without the limit.
    config = spy(tmp_path, "AddressSpaceHog", nbytes=2 * 2**30)
    reason = refusal(config, ModelPolicy(), SmokeLimits(memory_bytes=3 * 2**29))
    assert "Cannot allocate memory" in reason and REPORT not in reason


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.usefixtures("spies_importable")
def test_a_timeout_kills_everything_the_child_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    config = spy(tmp_path, "Sleeper", pid_file=str(pid_file))
    started = time.monotonic()
    reason = refusal(config, ModelPolicy(smoke_timeout_s=20), SmokeLimits())
    assert "did not load and run within 20s" in reason
    assert time.monotonic() - started < 40
    assert pid_file.exists(), "the child did not start its process within the timeout"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild)
    if not _gone(grandchild):  # pragma: no cover - leave nothing behind
        os.kill(grandchild, 9)


def test_the_smoke_timeout_stays_under_what_the_cli_waits() -> None:
    assert ModelPolicy(smoke_timeout_s=600).smoke_timeout_s == 600
    with pytest.raises(ValueError, match="less than or equal to 600"):
        ModelPolicy(smoke_timeout_s=601)
