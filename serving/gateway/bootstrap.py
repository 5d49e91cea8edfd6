"""What must hold before the ``gpugate`` application is deployed, wherever it is deployed
from (``gpugate serve``, ``gpugate deploy``, or Serve's own builder for ``serve deploy``
and a RayService): the state database's schema, the audit key, the config's tenants,
the first admin, the demo model and tenant when the config has no models, the config's
models in the registry, and the cluster secret. Every step is idempotent, so running it
again on every deploy is harmless.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.config import ConfigError, GatewayConfig
from serving.dataplane import ClusterSecret, cluster_secret
from serving.demo import demo_accuracy, ensure_demo_model
from serving.registry import Registry, Stages
from serving.state import audit, open_engine
from serving.tenancy import TenantStore, UserStore, ensure_admin, ensure_demo_tenant


@dataclass(frozen=True)
class Prepared:
    config: GatewayConfig  # with the demo model when the config had none
    state_dir: Path
    database_url: str | None
    secret: ClusterSecret
    admin_token: str | None  # the first admin's token, when it was made now
    demo_key: str | None  # the demo tenant's key, when the demo model serves
    demo_accuracy: float | None


def prepare(
    config: GatewayConfig,
    state_dir: Path,
    database_url: str | None,
    env: Mapping[str, str] = os.environ,
) -> Prepared:
    """Bring the state in line with ``config``. Raises ConfigError, TenantError,
    RegistryError, AuditKeyError or SchemaError, each naming what is wrong."""
    engine = open_engine(database_url, state_dir)
    audit.configure(engine, state_dir, **config.audit.model_dump())
    store = TenantStore(engine)
    store.upsert_from_config(config.tenants, env)
    admin_token = ensure_admin(UserStore(engine), state_dir)
    models = list(config.models)
    demo_key = accuracy = None
    if not models:
        models = [ensure_demo_model(state_dir)]
        demo_key = ensure_demo_tenant(store, state_dir)
        accuracy = demo_accuracy(state_dir)
    missing = [str(m.artifact) for m in models if not m.artifact.is_file()]
    if missing:
        raise ConfigError(f"artifact not found: {', '.join(missing)}")
    config = config.model_copy(update={"models": models})
    registry = Registry(engine, state_dir, config)
    metrics = {"digits:1": {"accuracy": accuracy}} if accuracy is not None else {}
    Stages(registry).adopt_config_models(models, metrics)
    try:
        secret = cluster_secret(config.security.cluster_secret_file, state_dir, env)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cluster secret: {exc}") from None
    return Prepared(config, state_dir, database_url, secret, admin_token, demo_key, accuracy)


def serve_config(config: GatewayConfig, state_dir: Path) -> dict[str, Any]:
    """A Ray Serve config (``serve deploy``, a RayService's ``serveConfigV2``) that runs
    the ``gpugate`` application built by :func:`serving.gateway.application` from
    ``config``. It holds no secret: the builder reads the database URL and the cluster
    secret from its environment (``GPUGATE_DATABASE_URL``, ``GPUGATE_CLUSTER_SECRET``)
    or the files the config names."""
    body = config.model_dump(mode="json", exclude={"database_url"}, exclude_defaults=True)
    return {
        "proxy_location": "Disabled",
        "applications": [
            {
                "name": "gpugate",
                "import_path": "serving.gateway:application",
                "route_prefix": None,
                "args": {"config": body, "state_dir": str(state_dir)},
            }
        ],
    }


def from_args(args: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Prepared:
    """:func:`prepare` for the builder's ``args`` (``config``: the config as a mapping;
    ``state_dir``), with the database URL from ``GPUGATE_DATABASE_URL`` or the config."""
    unknown = set(args) - {"config", "state_dir"}
    if unknown:
        raise ConfigError(f"unknown application args: {', '.join(sorted(unknown))}")
    try:
        config = GatewayConfig.model_validate(args.get("config") or {})
    except ValueError as exc:
        raise ConfigError(f"application args: {exc}") from None
    state_dir = Path(args.get("state_dir") or config.state_dir or ".gpugate")
    database_url = env.get("GPUGATE_DATABASE_URL") or config.database_url
    return prepare(config, state_dir.expanduser().resolve(), database_url, env)
