"""What ``locustfile.py`` drives: tenants, keys, request mixes, SLOs and the load shape.

Read once, when Locust imports the locustfile, from a YAML or JSON file named by
``GPUGATE_LOCUST_CONFIG`` and/or from environment variables (which override the
file). With neither, the gateway's demo tenant (key in ``$GPUGATE_STATE_DIR`` or
``./.gpugate``, ``demo_tenant.key``) calls the demo model ``digits``. The format
is documented in loadtests/README.md; ``tenants.example.yaml`` is a full example.

This module does not import Locust (nor gevent), so it can be tested and reused
anywhere. Unknown keys are errors that name the key, as in the gateway's config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Protocol = Literal["grpc", "http_json", "http_binary"]
PROTOCOLS: tuple[Protocol, ...] = ("grpc", "http_json", "http_binary")
SHAPES = ("steady", "ramp", "spike", "noisy-neighbour")
# Requests/s per user of a light tenant in the noisy-neighbour shape when it sets no rate.
LIGHT_TENANT_RATE = 5.0
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

ENV_FILE = "GPUGATE_LOCUST_CONFIG"
ENV_TENANTS = "GPUGATE_LOCUST_TENANTS"
ENV_MIX = "GPUGATE_LOCUST_MIX"
ENV_SLO = "GPUGATE_LOCUST_SLO"
ENV_SHAPE = "GPUGATE_LOCUST_SHAPE"
ENV_NOISY = "GPUGATE_LOCUST_NOISY_TENANT"
ENV_GRPC = "GPUGATE_LOCUST_GRPC"
ENV_MODEL = "GPUGATE_LOCUST_MODEL"
ENV_ROWS = "GPUGATE_LOCUST_ROWS"
ENV_RATE = "GPUGATE_LOCUST_RATE"


class LoadConfigError(ValueError):
    """The load-test configuration is missing, malformed or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Slo(_Strict):
    p99_ms: float | None = Field(default=None, gt=0, description="Largest allowed p99 latency.")
    error_rate: float | None = Field(
        default=None, ge=0, le=1, description="Largest allowed share of failed requests."
    )


class TenantLoad(_Strict):
    name: str
    api_key: str | None = None
    api_key_env: str | None = None
    model: str | None = None
    version: str | None = None
    weight: float = Field(default=1.0, gt=0, description="Share of Locust's users (-u).")
    users: int | None = Field(
        default=None, ge=1, description="A fixed number of users instead of a share."
    )
    rate: float | None = Field(
        default=None,
        ge=0,
        description="Requests/s per user; 0 = back to back; absent = back to back, except "
        "for a light tenant of the noisy-neighbour shape (LIGHT_TENANT_RATE).",
    )
    rows: int = Field(default=1, ge=1, le=65536, description="Rows per request.")
    mix: dict[Protocol, float] = Field(default_factory=lambda: dict.fromkeys(PROTOCOLS, 1.0))
    slo: Slo | None = None

    @model_validator(mode="after")
    def _check(self) -> TenantLoad:
        if not _TENANT.match(self.name):
            raise ValueError(f"tenant name {self.name!r} must match {_TENANT.pattern}")
        if self.api_key is None and self.api_key_env is None:
            raise ValueError(f"tenant {self.name!r}: set api_key or api_key_env")
        if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"tenant {self.name!r}: mix needs a positive share")
        return self

    def key(self, environ: Mapping[str, str]) -> str:
        if self.api_key is not None:
            return self.api_key
        assert self.api_key_env is not None
        value = environ.get(self.api_key_env)
        if not value:
            raise LoadConfigError(
                f"tenant {self.name!r}: environment variable {self.api_key_env} is not set"
            )
        return value


class LoadConfig(_Strict):
    model: str = "digits"
    version: str | None = None
    http: str = "http://127.0.0.1:8000"
    grpc: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    shape: Literal["steady", "ramp", "spike", "noisy-neighbour"] | None = None
    noisy_tenant: str | None = None
    tenants: list[TenantLoad] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> LoadConfig:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names repeat: {names}")
        if self.noisy_tenant is not None and self.noisy_tenant not in names:
            raise ValueError(f"noisy_tenant {self.noisy_tenant!r} is not one of {names}")
        if self.shape == "noisy-neighbour" and len(self.tenants) < 2:
            raise ValueError("the noisy-neighbour shape needs at least two tenants")
        return self

    def model_of(self, tenant: TenantLoad) -> tuple[str, str | None]:
        return tenant.model or self.model, tenant.version or self.version

    def grpc_target(self, http_host: str | None) -> str:
        """Explicit ``grpc``, else the HTTP host's name on the gateway's default port 8001."""
        if self.grpc:
            return self.grpc
        match = re.match(r"^(?:\w+://)?(\[[^\]]+\]|[^:/]+)", http_host or self.http)
        return f"{match.group(1) if match else '127.0.0.1'}:8001"

    def rate_of(self, tenant: TenantLoad) -> float:
        """Requests/s per user of ``tenant``'s users; 0 = back to back.

        In the noisy-neighbour shape the light tenants keep a modest rate unless told
        otherwise (a neighbour that floods is the noisy tenant's part, not theirs).
        """
        if tenant.rate is not None:
            return tenant.rate
        light = self.shape == "noisy-neighbour" and tenant.name != self.heavy_tenant().name
        return LIGHT_TENANT_RATE if light else 0.0

    def heavy_tenant(self) -> TenantLoad:
        """The tenant that floods in the noisy-neighbour shape (default: the first)."""
        name = self.noisy_tenant or self.tenants[0].name
        return next(t for t in self.tenants if t.name == name)


# ------------------------------------------------------------------ env parsing


def _pairs(text: str, what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise LoadConfigError(f"{what}: expected name=number, got {part!r}") from None
    return out


def _tenants_from_env(text: str) -> list[dict[str, Any]]:
    """``name:key[:weight]`` separated by commas (keys hold no ``:`` or ``,``)."""
    tenants = []
    for part in text.split(","):
        if not part.strip():
            continue
        fields = part.strip().split(":")
        if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
            raise LoadConfigError(f"{ENV_TENANTS}: expected name:key[:weight], got {part!r}")
        entry: dict[str, Any] = {"name": fields[0], "api_key": fields[1]}
        if len(fields) == 3:
            try:
                entry["weight"] = float(fields[2])
            except ValueError:
                raise LoadConfigError(f"{ENV_TENANTS}: bad weight in {part!r}") from None
        tenants.append(entry)
    return tenants


def _slos_from_env(text: str) -> dict[str, dict[str, float]]:
    """``p99_ms=..,error_rate=..`` for every tenant, or ``tenant:...;tenant:...``."""
    out: dict[str, dict[str, float]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        tenant, sep, figures = part.strip().rpartition(":")
        out[tenant if sep else "*"] = _pairs(figures, ENV_SLO)
    return out


def _demo_tenant(environ: Mapping[str, str]) -> list[dict[str, Any]]:
    state = Path(environ.get("GPUGATE_STATE_DIR") or ".gpugate")
    key_file = state / "demo_tenant.key"
    try:
        key = key_file.read_text().strip()
    except OSError:
        raise LoadConfigError(
            f"no tenants: set {ENV_FILE} or {ENV_TENANTS}, or run `gpugate serve` here first "
            f"(its demo tenant key would be in {key_file})"
        ) from None
    return [{"name": "demo", "api_key": key}]


def load_config(environ: Mapping[str, str] | None = None) -> LoadConfig:
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = environ.get(ENV_FILE)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise LoadConfigError(f"cannot read {ENV_FILE}={path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise LoadConfigError(f"{path}: expected a mapping at the top level")
        raw.update(loaded)
    if environ.get(ENV_TENANTS):
        raw["tenants"] = _tenants_from_env(environ[ENV_TENANTS])
    if not raw.get("tenants"):
        raw["tenants"] = _demo_tenant(environ)
    for env, key in ((ENV_SHAPE, "shape"), (ENV_NOISY, "noisy_tenant"), (ENV_GRPC, "grpc")):
        if environ.get(env):
            raw[key] = environ[env]
    if environ.get(ENV_MODEL):
        raw["model"], _, version = environ[ENV_MODEL].partition(":")
        if version:
            raw["version"] = version
    overrides: dict[str, Any] = {}
    if environ.get(ENV_MIX):
        overrides["mix"] = _pairs(environ[ENV_MIX], ENV_MIX)
    for env, key in ((ENV_ROWS, "rows"), (ENV_RATE, "rate")):
        if environ.get(env):
            overrides[key] = environ[env]
    slos = _slos_from_env(environ[ENV_SLO]) if environ.get(ENV_SLO) else {}
    tenants = []
    for entry in raw["tenants"]:
        if not isinstance(entry, dict):
            raise LoadConfigError(f"each tenant must be a mapping, got {entry!r}")
        entry = {**entry, **overrides}
        slo = slos.get(str(entry.get("name")), slos.get("*"))
        if slo is not None:
            entry["slo"] = slo
        tenants.append(entry)
    raw["tenants"] = tenants
    unknown = set(slos) - {"*"} - {str(t.get("name")) for t in tenants}
    if unknown:
        raise LoadConfigError(f"{ENV_SLO} names unknown tenants: {sorted(unknown)}")
    try:
        config = LoadConfig.model_validate(raw)
    except ValidationError as exc:
        raise LoadConfigError(f"load-test config: {_describe(exc)}") from None
    for tenant in config.tenants:
        tenant.key(environ)  # a missing key fails now, not in every user
    return config


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
