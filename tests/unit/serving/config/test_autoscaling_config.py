"""`models[].autoscaling`: bounds validated, documented, and a fixed count without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serving.config.schema import AutoscalingConfig, ConfigError, ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[4]

MODEL = """
models:
  - name: m
    artifact: weights/model.safetensors
    format: safetensors
    model_class: serving.demo:DigitsMLP
    max_batch_size: 32
    inputs: [{name: pixels, datatype: FP32, shape: [64]}]
    outputs: [{name: logits, datatype: FP32, shape: [10]}]
"""


def _model(**fields: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "name": "m",
        "artifact": "/nonexistent",
        "format": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [4]}],
        "max_batch_size": 32,
    }
    values.update(fields)
    return ModelConfig.model_validate(values)


def test_without_autoscaling_the_version_has_its_fixed_replicas() -> None:
    model = _model(replicas=3)
    assert model.autoscaling is None
    assert model.max_replicas == 3


def test_autoscaling_sets_the_bound_and_defaults_the_target_to_a_full_batch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gpugate.yaml"
    path.write_text(MODEL + "    autoscaling: {max_replicas: 4}\n")
    [model] = load_config(path).models
    assert model.autoscaling == AutoscalingConfig(max_replicas=4)
    assert (model.autoscaling.min_replicas, model.max_replicas) == (1, 4)
    assert model.target_rows_per_replica == 32
    custom = _model(autoscaling={"max_replicas": 2, "target_queued_rows_per_replica": 8})
    assert custom.target_rows_per_replica == 8
    # A registry round trip (model_dump, then validate) keeps it.
    assert ModelConfig.model_validate(custom.model_dump(mode="json")) == custom


@pytest.mark.parametrize(
    ("autoscaling", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas .2. must be >= min_replicas .3."),
        ({"min_replicas": 0, "max_replicas": 2}, "greater than or equal to 1"),
        ({}, "max_replicas"),
        ({"max_replicas": 2, "target_queued_rows_per_replica": 0}, "greater than or equal to 1"),
        ({"max_replicas": 2, "upscale_delay_s": -1}, "greater than or equal to 0"),
        ({"max_replicas": 2, "cooldown_s": 1}, "Extra inputs"),
        # 2 batches in flight per replica x 32 rows: 65 rows could never be held.
        ({"max_replicas": 2, "target_queued_rows_per_replica": 65}, r"must be <= .* \(64\)"),
    ],
)
def test_bad_bounds_are_refused(autoscaling: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _model(autoscaling=autoscaling)


def test_an_unknown_autoscaling_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "gpugate.yaml"
    path.write_text(MODEL + "    autoscaling: {max_replicas: 2, target: 4}\n")
    with pytest.raises(ConfigError, match=r"models\.0\.autoscaling\.target: unknown key"):
        load_config(path)


def test_every_autoscaling_field_is_documented() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    for name, field in AutoscalingConfig.model_fields.items():
        assert f"`models[].autoscaling.{name}`" in doc
        assert field.description
