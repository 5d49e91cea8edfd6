"""Config parsing: unknown keys named, docs cover every field, paths resolved."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from serving.config.schema import (
    ConfigError,
    CostsConfig,
    GatewayConfig,
    MetricPolicy,
    ModelConfig,
    ModelPolicy,
    PriceConfig,
    ServerConfig,
    TenantConfig,
    TensorConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[4]

MODEL = """
models:
  - name: m
    artifact: weights/model.safetensors
    format: safetensors
    model_class: serving.demo:DigitsMLP
    inputs: [{name: pixels, datatype: FP32, shape: [64]}]
    outputs: [{name: logits, datatype: FP32, shape: [10]}]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpugate.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_an_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.0\.batch_size: unknown key"):
        load_config(_write(tmp_path, MODEL + "    batch_size: 4\n"))
    with pytest.raises(ConfigError, match=r"server\.port: unknown key"):
        load_config(_write(tmp_path, "server: {port: 1}\n"))


def test_invalid_values_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown datatype 'FLOAT'"):
        load_config(_write(tmp_path, MODEL.replace("FP32, shape: [64]", "FLOAT, shape: [64]")))
    with pytest.raises(ConfigError, match="needs model_class"):
        load_config(
            _write(tmp_path, MODEL.replace("    model_class: serving.demo:DigitsMLP\n", ""))
        )
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="declared twice"):
        load_config(_write(tmp_path, MODEL + MODEL.replace("models:\n", "")))
    # 'shadow' owns mirrored canary traffic in the ledger; no tenant may take the name.
    with pytest.raises(ConfigError, match="reserved for mirrored canary traffic"):
        load_config(_write(tmp_path, "tenants: [{name: shadow, api_key_env: K}]\n"))


def test_relative_artifact_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MODEL))
    assert config.models[0].artifact == tmp_path / "weights" / "model.safetensors"
    assert config.models[0].signature().input_by_name["pixels"].shape == (64,)


def test_embedded_default_and_example_config_validate() -> None:
    default = load_config(None)
    assert default.server.http_port == 8000 and default.server.grpc_port == 8001
    assert default.server.metrics_port == 8002 and default.server.host == "127.0.0.1"
    example = load_config(ROOT / "docs" / "example-config.yaml")
    assert [t.name for t in example.tenants] == ["acme", "globex"]


@pytest.mark.parametrize(
    "model",
    [
        GatewayConfig,
        ModelPolicy,
        MetricPolicy,
        ServerConfig,
        ModelConfig,
        TensorConfig,
        TenantConfig,
        CostsConfig,
        PriceConfig,
    ],
)
def test_every_field_is_documented(model: type[BaseModel]) -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    for name, field in model.model_fields.items():
        assert f"{name}`" in doc, f"{model.__name__}.{name} missing from docs/config.md"
        if model is not GatewayConfig:
            assert field.description, f"{model.__name__}.{name} has no description"


def test_gateway_resources_are_custom_ray_resources(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "server: {gateway_resources: {gpugate_gateway: 1}}\n"))
    assert config.server.gateway_resources == {"gpugate_gateway": 1.0}
    assert GatewayConfig().server.gateway_resources == {}  # one machine: anywhere
    # Ray refuses its built-in resources here; the config says so before Ray does.
    with pytest.raises(ConfigError, match="'GPU' is not a custom resource name"):
        load_config(_write(tmp_path, "server: {gateway_resources: {GPU: 1}}\n"))
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(_write(tmp_path, "server: {gateway_resources: {gpugate_gateway: 0}}\n"))


def test_one_tenants_held_refusals_cannot_fill_the_grpc_port(tmp_path: Path) -> None:
    ok = "server: {grpc_max_concurrent_calls: 128, grpc_refusal_hold_max_per_tenant: 64}\n"
    assert load_config(_write(tmp_path, ok)).server.grpc_refusal_hold_max_per_tenant == 64
    over = "server: {grpc_max_concurrent_calls: 100, grpc_refusal_hold_max_per_tenant: 64}\n"
    with pytest.raises(ConfigError, match="at most half of grpc_max_concurrent_calls"):
        load_config(_write(tmp_path, over))
