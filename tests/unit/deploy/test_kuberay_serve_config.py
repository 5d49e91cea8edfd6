"""The RayService's serveConfigV2 is what `gpugate config render` writes for the config
in deploy/kuberay/config, byte for byte, and a Serve config that Ray 2.60 accepts.

KubeRay compares serveConfigV2 as a string to decide whether to submit it again, so the
text matters, not only what it parses to.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pydantic
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serving.cli.main import main as gpugate
from serving.config import load_config
from serving.gateway import serve_config
from tests.unit.deploy import kuberay as k

STATE_DIR = "/var/lib/gpugate"


def rendered(tmp_path: Path) -> str:
    out = tmp_path / "serve.yaml"
    argv = ["config", "render", "--config", str(k.CONFIG), "--state-dir", STATE_DIR]
    assert gpugate([*argv, "-o", str(out)]) == 0
    return out.read_text()


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_serve_config", k.KUBERAY / "render_serve_config.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_config_v2_is_the_rendered_config(tmp_path: Path) -> None:
    assert k.serve_config_text() == rendered(tmp_path), (
        "deploy/kuberay/02-rayservice.yaml is stale: run "
        ".venv/bin/python deploy/kuberay/render_serve_config.py"
    )
    # the same as the function behind the command
    assert k.serve_config() == serve_config(load_config(k.CONFIG), Path(STATE_DIR))


def test_the_render_script_writes_what_the_command_prints(tmp_path: Path) -> None:
    module = script()
    assert module.STATE_DIR == STATE_DIR and module.CONFIG == k.CONFIG
    assert module.render() == rendered(tmp_path)
    assert module.main(["--check"]) == 0
    manifest = (k.KUBERAY / "02-rayservice.yaml").read_text()
    assert module.splice(manifest, k.serve_config_text()) == manifest
    # a changed config replaces the block and nothing else
    changed = module.splice(manifest, "proxy_location: Disabled\napplications: []\n")
    assert changed.count("\n") < manifest.count("\n")
    assert "applications: []" in changed and "rayClusterConfig:" in changed
    assert changed.split("serveConfigV2: |")[0] == manifest.split("serveConfigV2: |")[0]


def unknown_keys(model: type[pydantic.BaseModel], data: dict[str, Any]) -> set[str]:
    return set(data) - set(model.model_fields)


def test_ray_serve_accepts_it_with_no_key_it_would_ignore() -> None:
    data = k.serve_config()
    # Ray's schema ignores unknown keys, which would then do nothing: refuse them here.
    assert unknown_keys(ServeDeploySchema, data) == set()
    schema = ServeDeploySchema.model_validate(data)
    (app,) = data["applications"]
    assert unknown_keys(ServeApplicationSchema, app) == set()
    # Serve's own proxies are off: the gateways open the ports themselves.
    assert schema.proxy_location.value == "Disabled"
    assert "deployments" not in app and "runtime_env" not in app, "nothing overrides the app"
    module_name, _, attribute = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    assert builder.__module__ == "serving.gateway.app" and builder.__name__ == "application"


def test_the_builder_args_are_a_config_gpugate_accepts_and_no_secret() -> None:
    args = k.app_args()
    assert set(args) == {"config", "state_dir"}  # what serving.gateway.bootstrap.from_args takes
    config = k.served_config()
    assert config == load_config(k.CONFIG).model_copy(update={"database_url": None})
    text = k.serve_config_text()
    assert config.database_url is None and "postgresql" not in text
    assert not re.search(r"secret|password|token", text, re.I)
    assert args["state_dir"] == STATE_DIR
