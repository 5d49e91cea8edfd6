"""The load-test configuration (``loadtests/locust_config.py``): file, environment, errors.

The module imports neither Locust nor gevent, so it is loaded here directly.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

PATH = Path(__file__).resolve().parents[3] / "loadtests" / "locust_config.py"


@pytest.fixture(scope="module")
def lc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("locust_config", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["locust_config"] = module  # pydantic resolves annotations through it
    spec.loader.exec_module(module)
    return module


def test_file_with_env_overrides(lc: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "model: digits\nshape: steady\ntenants:\n"
        "  - {name: a, api_key_env: KEY_A, weight: 3, mix: {grpc: 2, http_json: 1}}\n"
        "  - {name: b, api_key: kb, users: 2, rate: 5, slo: {p99_ms: 100}}\n"
    )
    env = {
        "GPUGATE_LOCUST_CONFIG": str(path),
        "KEY_A": "ka",
        "GPUGATE_LOCUST_SHAPE": "noisy-neighbour",
        "GPUGATE_LOCUST_SLO": "a:error_rate=0.01;b:p99_ms=50,error_rate=0",
        "GPUGATE_LOCUST_MODEL": "bench:1",
    }
    config = lc.load_config(env)
    a, b = config.tenants
    assert a.key(env) == "ka" and b.key(env) == "kb"
    assert a.mix == {"grpc": 2.0, "http_json": 1.0} and a.weight == 3
    assert b.users == 2 and b.rate == 5
    assert a.slo.error_rate == 0.01 and a.slo.p99_ms is None
    assert b.slo.p99_ms == 50 and b.slo.error_rate == 0
    assert config.shape == "noisy-neighbour" and config.heavy_tenant().name == "a"
    assert config.model_of(a) == ("bench", "1")
    assert config.grpc_target("http://10.0.0.5:18000") == "10.0.0.5:8001"


def test_light_tenants_of_the_noisy_shape_keep_a_modest_rate(lc: ModuleType) -> None:
    env = {"GPUGATE_LOCUST_TENANTS": "heavy:k1,light:k2,paced:k3"}
    plain = lc.load_config(env)
    assert [plain.rate_of(t) for t in plain.tenants] == [0.0, 0.0, 0.0]
    noisy = lc.load_config({**env, "GPUGATE_LOCUST_SHAPE": "noisy-neighbour"})
    heavy, light, _ = noisy.tenants
    assert noisy.rate_of(heavy) == 0.0  # the flood
    assert noisy.rate_of(light) == lc.LIGHT_TENANT_RATE == 5.0
    # A rate given (also 0, back to back) wins, for the noisy tenant too.
    given = lc.load_config(
        {**env, "GPUGATE_LOCUST_SHAPE": "noisy-neighbour", "GPUGATE_LOCUST_RATE": "0"}
    )
    assert [given.rate_of(t) for t in given.tenants] == [0.0, 0.0, 0.0]


def test_tenants_from_env_alone(lc: ModuleType) -> None:
    env = {
        "GPUGATE_LOCUST_TENANTS": "x:gg_abc-1:2,y:gg_def_2",
        "GPUGATE_LOCUST_MIX": "grpc=1",
        "GPUGATE_LOCUST_SLO": "p99_ms=250",
        "GPUGATE_LOCUST_GRPC": "127.0.0.1:9001",
    }
    config = lc.load_config(env)
    assert [(t.name, t.api_key, t.weight) for t in config.tenants] == [
        ("x", "gg_abc-1", 2.0),
        ("y", "gg_def_2", 1.0),
    ]
    assert all(t.mix == {"grpc": 1.0} and t.slo.p99_ms == 250 for t in config.tenants)
    assert config.grpc_target(None) == "127.0.0.1:9001"


def test_demo_tenant_when_nothing_is_configured(lc: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "demo_tenant.key").write_text("gg_demo\n")
    config = lc.load_config({"GPUGATE_STATE_DIR": str(tmp_path)})
    assert [(t.name, t.api_key) for t in config.tenants] == [("demo", "gg_demo")]
    with pytest.raises(lc.LoadConfigError, match=r"demo_tenant\.key"):
        lc.load_config({"GPUGATE_STATE_DIR": str(tmp_path / "none")})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GPUGATE_LOCUST_TENANTS": "a:k", "GPUGATE_LOCUST_SHAPE": "wave"}, "shape"),
        ({"GPUGATE_LOCUST_TENANTS": "a"}, "name:key"),
        ({"GPUGATE_LOCUST_TENANTS": "a:k", "GPUGATE_LOCUST_SLO": "b:p99_ms=1"}, "unknown tenants"),
        ({"GPUGATE_LOCUST_TENANTS": "a:k", "GPUGATE_LOCUST_SLO": "p99_ms=fast"}, "name=number"),
        ({"GPUGATE_LOCUST_TENANTS": "a:k,a:j"}, "repeat"),
        ({"GPUGATE_LOCUST_TENANTS": "a:k", "GPUGATE_LOCUST_SHAPE": "noisy-neighbour"}, "two"),
        ({"GPUGATE_LOCUST_TENANTS": "a:k", "GPUGATE_LOCUST_MIX": "grpc=0"}, "positive"),
        ({"GPUGATE_LOCUST_TENANTS": "a:k", "GPUGATE_LOCUST_MIX": "ftp=1"}, r"mix\.ftp"),
    ],
)
def test_errors_name_the_problem(lc: ModuleType, env: dict[str, str], message: str) -> None:
    with pytest.raises(lc.LoadConfigError, match=message):
        lc.load_config(env)


def test_missing_key_variable_and_unknown_key(lc: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"tenants": [{"name": "a", "api_key_env": "NOPE"}]}')
    with pytest.raises(lc.LoadConfigError, match="NOPE is not set"):
        lc.load_config({"GPUGATE_LOCUST_CONFIG": str(path)})
    path.write_text('{"tenants": [{"name": "a", "api_key": "k"}], "colour": 1}')
    with pytest.raises(lc.LoadConfigError, match="colour"):
        lc.load_config({"GPUGATE_LOCUST_CONFIG": str(path)})
