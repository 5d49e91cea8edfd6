"""docs/config.md, generated from the pydantic models: ``python -m serving.config.reference``.

Every key's default and description come from the models' fields, and each section's
prose from its model's docstring, so the reference cannot drift from what
``load_config`` accepts (a test regenerates it and compares).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from serving.config.schema import (
    AutoscalingConfig,
    CostsConfig,
    GatewayConfig,
    MetricPolicy,
    ModelConfig,
    ModelPolicy,
    PriceConfig,
    TenantConfig,
    TensorConfig,
)
from serving.config.server import (
    AuditConfig,
    ConsoleConfig,
    HttpLimits,
    SecurityConfig,
    ServerConfig,
    TlsConfig,
)

INTRO = """\
# Configuration

`gpugate serve --config FILE` reads YAML validated by pydantic models
(`serving/config/schema.py`, `serving/config/server.py`). Every key is listed here;
an unknown key anywhere is an error that names it (`models.0.batch: unknown key`).
Relative `artifact` paths are relative to the config file. Command-line flags
(`--host`, `--*-port`, `--state-dir`, `--database-url`) override the file. An example:
[example-config.yaml](example-config.yaml).

This page is generated from the models by `python -m serving.config.reference`
(`make docs`); a test fails when it is stale.
"""

APPENDIX = """\
## Artifact formats

- `safetensors`: weights only, loaded into `model_class` (`package.module:Class`,
  constructed with `model_kwargs`) with a strict state-dict match. The only
  format safe for untrusted artifacts.
- `torchscript`: a `torch.jit.save` file.
- `export`: a `torch.export.save` archive (`.pt2`) with a dynamic batch
  dimension. Archives with pickled payloads, opaque objects, AOTInductor code
  or legacy layouts are refused before torch opens them.

Artifacts are never unpickled (`torch.load` is not used). TorchScript and
export archives still contain code that torch runs: load them only from sources
you trust.
"""

# (heading, key prefix, model); the order of the page.
SECTIONS: tuple[tuple[str, str, type[BaseModel]], ...] = (
    ("Top level", "", GatewayConfig),
    ("`server`", "server.", ServerConfig),
    ("`server.tls`: TLS on the HTTP and gRPC ports", "server.tls.", TlsConfig),
    ("`server.http`: limits of the HTTP port", "server.http.", HttpLimits),
    ("`server.console`: the web console", "server.console.", ConsoleConfig),
    ("`models[]`: one served model version", "models[].", ModelConfig),
    ("`models[].inputs[]`, `models[].outputs[]`", "models[].inputs[].", TensorConfig),
    ("`models[].autoscaling`: replicas on demand", "models[].autoscaling.", AutoscalingConfig),
    ("`tenants[]`", "tenants[].", TenantConfig),
    ("`costs`: pricing for the cost ledger", "costs.", CostsConfig),
    ("`costs.prices[]`", "costs.prices[].", PriceConfig),
    ("`policies`: the model registry's guardrails and approvals", "policies.NAME.", ModelPolicy),
    ("`policies.NAME.metrics.METRIC`", "policies.NAME.metrics.METRIC.", MetricPolicy),
    ("`security`: secrets kept outside the config", "security.", SecurityConfig),
    ("`audit`: the audit log's key and anchor", "audit.", AuditConfig),
)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "see below"
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(model: type[BaseModel]) -> str:
    doc = model.__doc__
    if not doc or doc == BaseModel.__doc__:
        return ""
    return inspect.cleandoc(doc)


def render() -> str:
    """The whole page, as docs/config.md holds it."""
    parts = [INTRO]
    for heading, prefix, model in SECTIONS:
        lines = [f"## {heading}", ""]
        doc = _doc(model)
        if doc:
            lines += [doc, ""]
        lines += ["| key | default | description |", "|---|---|---|"]
        for name, info in model.model_fields.items():
            lines.append(
                f"| `{prefix}{name}` | {_default(info)} | {_cell(info.description or '')} |"
            )
        parts.append("\n".join(lines) + "\n")
    parts.append(APPENDIX)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Print the page, or write it to the one path given."""
    args = sys.argv[1:] if argv is None else argv
    page = render()
    if args:
        Path(args[0]).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
