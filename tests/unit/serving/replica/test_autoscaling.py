"""The autoscaling policy Serve's controller runs, and the options a version deploys with."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest

from serving.config.schema import ModelConfig
from serving.replica.autoscaling import (
    LOOK_BACK_S,
    REPORT_INTERVAL_S,
    ROWS_METRIC,
    QueuedRowsPolicy,
    replica_count_options,
)


@dataclass
class Context:
    """What the policy reads of Serve's AutoscalingContext."""

    target_num_replicas: int
    aggregated_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _model(**fields: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "name": "m",
        "version": "2",
        "artifact": "/nonexistent",
        "format": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [4]}],
    }
    values.update(fields)
    return ModelConfig.model_validate(values)


def test_the_policy_asks_for_the_replicas_the_rows_need() -> None:
    policy = QueuedRowsPolicy(target_rows_per_replica=32)
    rows = {ROWS_METRIC: {"r1": 30.0, "r2": 50.5}}
    assert policy(Context(2, rows)) == (3, {})  # 80.5 rows / 32
    assert policy(Context(2, {ROWS_METRIC: {"r1": 64.0}})) == (2, {})  # exactly two
    # Idle (or a residue of averaging): none needed; Serve keeps min_replicas.
    assert policy(Context(3, {ROWS_METRIC: {"r1": 1e-12, "r2": 0.0}})) == (0, {})


def test_before_any_report_the_policy_keeps_the_count() -> None:
    policy = QueuedRowsPolicy(target_rows_per_replica=8)
    assert policy(Context(2)) == (2, {})
    assert policy(Context(2, {"other": {"r1": 100.0}})) == (2, {})


def test_the_policy_survives_pickling_and_refuses_a_zero_target() -> None:
    # Serve ships it to its controller (by value there; plain pickling here).
    policy = pickle.loads(pickle.dumps(QueuedRowsPolicy(16)))
    assert policy(Context(1, {ROWS_METRIC: {"r1": 33.0}})) == (3, {})
    with pytest.raises(ValueError, match="> 0"):
        QueuedRowsPolicy(0)


def test_a_fixed_version_deploys_its_replica_count() -> None:
    assert replica_count_options(_model(replicas=3)) == {"num_replicas": 3}


def test_an_autoscaled_version_deploys_serves_autoscaling_config_on_the_rows() -> None:
    model = _model(
        max_batch_size=16,
        autoscaling={
            "min_replicas": 2,
            "max_replicas": 5,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
        },
    )
    options = replica_count_options(model)
    assert set(options) == {"autoscaling_config"}  # num_replicas would conflict
    config = options["autoscaling_config"]
    assert config["min_replicas"] == config["initial_replicas"] == 2
    assert config["max_replicas"] == 5
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (1, 3)
    assert config["metrics_interval_s"] == REPORT_INTERVAL_S < LOOK_BACK_S
    assert config["look_back_period_s"] == LOOK_BACK_S
    assert config["policy"] == {
        "policy_function": "serving.replica.autoscaling:QueuedRowsPolicy",
        "policy_kwargs": {"target_rows_per_replica": 16},  # the default: a full batch
    }
