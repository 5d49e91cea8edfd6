"""The demo models: the digits MLP trains on first start; the bench model's config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.config.schema import ModelConfig
from serving.demo.models import (
    BENCH_IN,
    BENCH_OUT,
    BenchMLP,
    bench_model_config,
    demo_accuracy,
    ensure_demo_model,
    load_digits_split,
)
from serving.replica.runner import ModelRunner


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelConfig]:
    state_dir = tmp_path_factory.mktemp("state")
    return state_dir, ensure_demo_model(state_dir)


def test_demo_trains_and_records_accuracy(demo_state: tuple[Path, ModelConfig]) -> None:
    state_dir, config = demo_state
    directory = state_dir / "models" / "digits" / "1"
    assert config.artifact == directory / "model.safetensors"
    assert (config.name, config.version, config.format) == ("digits", "1", "safetensors")
    assert config.max_batch_size == 64 and config.max_queue_delay_ms == 0
    assert demo_accuracy(state_dir) >= 0.95
    meta = json.loads((directory / "model.json").read_text())
    assert meta["seed"] == 0 and meta["train_samples"] + meta["test_samples"] == 1797
    assert {"training_seconds", "created"} <= meta.keys()
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_demo_second_call_reuses(demo_state: tuple[Path, ModelConfig]) -> None:
    state_dir, config = demo_state
    files = [config.artifact, config.artifact.with_name("model.json")]
    before = [p.stat().st_mtime_ns for p in files]
    assert ensure_demo_model(state_dir) == config
    assert [p.stat().st_mtime_ns for p in files] == before


def test_demo_runner_predicts_test_digits(demo_state: tuple[Path, ModelConfig]) -> None:
    state_dir, config = demo_state
    runner = ModelRunner(config, num_threads=1)
    runner.warmup()
    _, x_test, _, y_test = load_digits_split()
    out, _ = runner.run({"pixels": x_test})  # raw pixel values 0..16
    assert out["logits"].shape == (len(x_test), 10)
    accuracy = float((out["logits"].argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(demo_accuracy(state_dir), abs=0.01)


def test_bench_model(tmp_path: Path) -> None:
    config = bench_model_config(tmp_path, hidden=64, depth=2, replicas=2, max_queue_delay_ms=2)
    assert (config.replicas, config.max_queue_delay_ms, config.max_batch_size) == (2, 2, 64)
    mtime = config.artifact.stat().st_mtime_ns
    assert bench_model_config(tmp_path, hidden=64, depth=2).artifact == config.artifact
    assert config.artifact.stat().st_mtime_ns == mtime
    runner = ModelRunner(config, num_threads=1)
    x = np.random.default_rng(0).standard_normal((5, BENCH_IN), dtype=np.float32)
    out, _ = runner.run({"x": x})
    assert out["y"].shape == (5, BENCH_OUT) and np.isfinite(out["y"]).all()
    # Seeded: the weights on disk are the ones a fresh seeded BenchMLP has.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = BenchMLP(BENCH_IN, 64, 2, BENCH_OUT).eval()
    with torch.inference_mode():
        np.testing.assert_allclose(out["y"], fresh(torch.from_numpy(x)).numpy(), rtol=1e-5)
