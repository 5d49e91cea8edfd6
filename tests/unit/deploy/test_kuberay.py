"""deploy/kuberay and deploy/Dockerfile: the manifests agree with how gpugate runs.

No Kubernetes here: these tests parse every manifest and check what can drift
silently from the code: ports, probe routes, the config the driver reads, the
environment it reads, where the gateway replica (the process that opens the ports)
can land and what the Services select, grace periods against the drain timeout,
GPU sizing, and the versions pinned in the image.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.http_server import build_http_app
from serving.cli.main import build_parser
from serving.config.schema import GatewayConfig, load_config

ROOT = Path(__file__).resolve().parents[3]
KUBERAY = ROOT / "deploy" / "kuberay"
KINDS = {
    "ConfigMap",
    "Deployment",
    "PersistentVolumeClaim",
    "Pod",
    "RayCluster",
    "Secret",
    "Service",
    "ServiceMonitor",
}
# Read by Ray itself (token authentication), not by gpugate's code.
RAY_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
# How long the driver needs past the drain itself: removing the Serve applications
# (~3-4 s each, measured over Ray Client) and closing the Ray Client session.
DRIVER_EXIT_MARGIN_S = 30


def _docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(doc)
    return docs


DOCS = _docs()


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def config() -> GatewayConfig:
    return GatewayConfig.model_validate(yaml.safe_load(config_text()))


def config_text() -> str:
    text: str = one("ConfigMap", "gpugate-config")["data"]["config.yaml"]
    return text


def cluster() -> dict[str, Any]:
    return one("RayCluster")


def group(name: str) -> dict[str, Any]:
    groups = [g for g in cluster()["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    assert len(groups) == 1, name
    return groups[0]


def container(pod_spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    cs = pod_spec["containers"]
    if name is None:
        assert len(cs) == 1
        return cs[0]
    return next(c for c in cs if c["name"] == name)


def driver() -> dict[str, Any]:
    return container(one("Deployment", "gpugate-driver")["spec"]["template"]["spec"])


def driver_env() -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in driver()["env"]}


def gateway_group() -> dict[str, Any]:
    """The worker group that advertises the gateway's custom resources."""
    wanted = config().server.gateway_resources
    assert wanted, "the cluster config must pin the gateway (server.gateway_resources)"
    groups = [
        g
        for g in cluster()["spec"]["workerGroupSpecs"]
        if all(ray_resources(g).get(k, 0) >= v for k, v in wanted.items())
    ]
    assert len(groups) == 1, [g["groupName"] for g in groups]
    return groups[0]


def ray_resources(group_spec: dict[str, Any]) -> dict[str, float]:
    """KubeRay's rayStartParams.resources: a JSON object inside a quoted string."""
    raw = group_spec.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    parsed = json.loads(json.loads(raw))
    assert isinstance(parsed, dict)
    return {str(k): float(v) for k, v in parsed.items()}


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod template that runs gpugate code, by a short name."""
    specs = {"driver": one("Deployment", "gpugate-driver")["spec"]["template"]["spec"]}
    specs["head"] = cluster()["spec"]["headGroupSpec"]["template"]["spec"]
    for g in cluster()["spec"]["workerGroupSpecs"]:
        specs[g["groupName"]] = g["template"]["spec"]
    return specs


def quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ------------------------------------------------------------------ the manifests


def test_every_manifest_parses_into_known_kinds_with_names() -> None:
    files = sorted(p.name for p in KUBERAY.glob("*.yaml"))
    assert "03-raycluster.yaml" in files and "04-driver.yaml" in files
    for doc in DOCS:
        assert doc["kind"] in KINDS, doc["kind"]
        assert doc["apiVersion"] and doc["metadata"]["name"]
    assert cluster()["apiVersion"] == "ray.io/v1"


def test_the_configmap_config_is_one_gpugate_accepts(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config_text())
    loaded = load_config(path)  # the driver's own loader: unknown keys are errors
    assert loaded.server.host == "0.0.0.0", "the Service reaches the gateway on the pod IP"
    # On a cluster the state database is PostgreSQL from the driver's environment,
    # never SQLite on a volume several pods write.
    assert loaded.database_url is None and loaded.state_dir is None
    assert loaded.models, "the example config serves a GPU model"


def test_the_driver_command_parses_and_reads_the_mounted_config() -> None:
    d = driver()
    command = d["command"] + d.get("args", [])
    assert command[0] == "gpugate"
    args = build_parser().parse_args(command[1:])
    assert args.command == "serve"
    mounts = {m["name"]: m["mountPath"] for m in d["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_specs()["driver"]["volumes"]}
    cm = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name"))
    assert volumes[cm]["configMap"]["name"] == "gpugate-config"
    assert args.config == Path(mounts[cm]) / "config.yaml"
    assert "config.yaml" in one("ConfigMap", "gpugate-config")["data"]
    # Ports, host and state come from the config and the environment, not flags that
    # would silently override them.
    assert (args.host, args.http_port, args.grpc_port, args.metrics_port) == (None,) * 4


def test_driver_environment_holds_only_variables_that_something_reads() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "serving").rglob("*.py"))
    read_by_gpugate = set(re.findall(r"environ(?:\.get)?[\[(]\"([A-Z][A-Z0-9_]+)\"", source))
    assert {"GPUGATE_STATE_DIR", "GPUGATE_DATABASE_URL", "RAY_ADDRESS"} <= read_by_gpugate
    tenant_vars = {t.api_key_env for t in config().tenants}
    env = driver_env()
    for name in env:
        assert (
            name in read_by_gpugate
            or name in tenant_vars
            or name in RAY_ENV
            or name.startswith("OTEL_")  # serving.gateway.telemetry.otel_env hands them on
        ), f"{name}: nothing reads it"
    # Without these the driver refuses to start (a config tenant's key is missing) or
    # falls back to SQLite in the state folder.
    assert tenant_vars <= set(env)
    assert "GPUGATE_DATABASE_URL" in env


def test_secret_references_resolve_and_the_database_is_postgres() -> None:
    secrets = {d["metadata"]["name"]: d["stringData"] for d in DOCS if d["kind"] == "Secret"}
    for e in driver()["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets[ref["name"]], ref
    db = driver_env()["GPUGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert secrets[db["name"]][db["key"]].startswith("postgresql+psycopg://")
    # The driver's Ray token is the one KubeRay gives the Ray pods.
    auth = cluster()["spec"]["authOptions"]
    assert auth["mode"] == "token"
    token = driver_env()["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (token["name"], token["key"]) == (auth["secretName"], "auth_token")
    assert driver_env()["RAY_AUTH_MODE"]["value"] == "token"


def test_the_driver_joins_the_cluster_through_its_head_service_ray_client_port() -> None:
    address = driver_env()["RAY_ADDRESS"]["value"]
    match = re.fullmatch(r"ray://([a-z0-9.-]+):(\d+)", address)
    assert match, address
    head = container(cluster()["spec"]["headGroupSpec"]["template"]["spec"])
    # KubeRay names the head Service <RayCluster name>-head-svc.
    assert match.group(1) == f"{cluster()['metadata']['name']}-head-svc"
    assert int(match.group(2)) == ports(head)["client"]


# ------------------------------------------- where the gateway runs, what serves it


def test_only_the_gateway_group_can_host_the_gateway_replica() -> None:
    g = gateway_group()
    head = cluster()["spec"]["headGroupSpec"]
    assert ray_resources(head) == {}
    assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 1, "one gateway replica"
    # Models always reserve CPUs (num_cpus > 0): none lands in the gateway's pod or
    # on the head.
    assert g["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(m.num_cpus > 0 for m in config().models)


def test_gateway_container_ports_are_the_configured_ones() -> None:
    server = config().server
    c = container(gateway_group()["template"]["spec"])
    assert ports(c) == {
        "http": server.http_port,
        "grpc": server.grpc_port,
        "metrics": server.metrics_port,
    }
    # The documented defaults (README: 8000/8001/8002) are what the example keeps.
    assert (server.http_port, server.grpc_port, server.metrics_port) == (8000, 8001, 8002)


@pytest.mark.parametrize("name", ["gpugate", "gpugate-metrics"])
def test_services_select_the_gateway_pod_and_target_its_ports(name: str) -> None:
    svc = one("Service", name)
    g = gateway_group()
    # The labels KubeRay puts on the pods of a worker group.
    labels = {"ray.io/cluster": cluster()["metadata"]["name"], "ray.io/group": g["groupName"]}
    labels |= g["template"].get("metadata", {}).get("labels", {})
    selector = svc["spec"]["selector"]
    assert selector.items() <= labels.items(), selector
    assert "ray.io/group" in selector, "must not select Ray pods without the gateway"
    container_ports = ports(container(g["template"]["spec"]))
    for p in svc["spec"]["ports"]:
        target = p["targetPort"]
        number = container_ports[target] if isinstance(target, str) else target
        assert number in container_ports.values()
        assert p["port"] == number, "clients use the documented port numbers"


def test_client_service_serves_http_and_grpc_and_metrics_are_scraped() -> None:
    server = config().server
    client = {p["name"]: p["port"] for p in one("Service", "gpugate")["spec"]["ports"]}
    assert client == {"http": server.http_port, "grpc": server.grpc_port}
    metrics = one("Service", "gpugate-metrics")
    assert [p["port"] for p in metrics["spec"]["ports"]] == [server.metrics_port]
    assert metrics["metadata"]["annotations"]["prometheus.io/port"] == str(server.metrics_port)
    monitor = one("ServiceMonitor")
    sel = monitor["spec"]["selector"]["matchLabels"]
    assert sel.items() <= metrics["metadata"]["labels"].items()
    port_names = {p["name"] for p in metrics["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names


def test_probes_hit_routes_the_http_server_serves() -> None:
    app = build_http_app(None)  # type: ignore[arg-type]  # only the route table is read
    get_routes = {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}
    c = container(gateway_group()["template"]["spec"])
    probes = [c[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in c]
    assert probes and c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in probes:
        assert probe["httpGet"]["path"] in get_routes
        port = probe["httpGet"]["port"]
        assert (ports(c)[port] if isinstance(port, str) else port) == config().server.http_port


def test_grace_periods_cover_the_drain_timeout() -> None:
    drain = config().server.drain_timeout_s
    specs = pod_specs()
    assert specs["driver"]["terminationGracePeriodSeconds"] >= drain + DRIVER_EXIT_MARGIN_S
    gw = gateway_group()["template"]["spec"]
    assert gw["terminationGracePeriodSeconds"] >= drain
    strategy = one("Deployment", "gpugate-driver")["spec"]
    assert strategy["replicas"] == 1 and strategy["strategy"]["type"] == "Recreate"


# ------------------------------------------------------------ state and the GPUs


def test_state_volume_is_shared_and_mounted_at_the_same_path_everywhere() -> None:
    pvc = one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    state_dir = driver_env()["GPUGATE_STATE_DIR"]["value"]
    # The registry hands replicas STATE_DIR/artifacts/... paths; every pod that runs
    # gpugate code other than the head (Serve controller only) must see that path.
    for name, spec in pod_specs().items():
        if name == "head":
            continue
        claims = {
            v["name"]
            for v in spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        assert len(claims) == 1, name
        mounts = [m for m in container(spec)["volumeMounts"] if m["name"] in claims]
        assert [m["mountPath"] for m in mounts] == [state_dir], name
        assert spec["securityContext"]["fsGroup"] == 1000, "the image's uid must write it"
    for m in config().models:
        assert m.artifact.is_relative_to(state_dir), "the driver reads artifacts from the volume"


def test_every_gpu_model_fits_a_gpu_worker_group() -> None:
    groups = cluster()["spec"]["workerGroupSpecs"]
    for m in config().models:
        if m.num_gpus == 0:
            continue
        fits = []
        for g in groups:
            limits = container(g["template"]["spec"])["resources"]["limits"]
            gpus = quantity(limits.get("nvidia.com/gpu", 0))
            if gpus >= m.num_gpus and quantity(limits["cpu"]) >= m.num_cpus:
                assert "num-gpus" not in g["rayStartParams"], "taken from the limit"
                per_pod = min(gpus // m.num_gpus, quantity(limits["cpu"]) // m.num_cpus)
                fits.append(per_pod * g["maxReplicas"])
        assert fits and max(fits) >= m.max_replicas, f"{m.name}:{m.version} has no room"


def test_images_are_one_build_with_a_cuda_variant_for_the_gpu_group() -> None:
    base = driver()["image"]
    for name, spec in pod_specs().items():
        c = container(spec)
        gpus = quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        assert c["image"] == (f"{base}-cuda" if gpus else base), name
    assert one("Pod", "gpugate-artifact-loader")["spec"]["containers"][0]["image"] == base


# ----------------------------------------------------------------- versions, image


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.match(r"([a-z\[\]]+)==([\w.]+)", d).groups() for d in deps if "==" in d)  # type: ignore[union-attr]


def test_raycluster_ray_version_is_the_pinned_one() -> None:
    assert cluster()["spec"]["rayVersion"] == _pins()["ray[serve]"]


def test_dockerfile_installs_pinned_torch_first_then_gpugate() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    logical = text.replace("\\\n", " ")  # a RUN with its continuation lines, as one
    runs = [line for line in logical.splitlines() if line.startswith("RUN ")]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_at = next(
        i for i, r in enumerate(runs) if re.search(r"pip install .*gpugate-\*\.whl", r)
    )
    assert torch_at < project_at, "torch first, or pip pulls the CUDA build from PyPI"
    # The wheel is built in a stage of its own, with the native door and its headers.
    build = next(i for i, r in enumerate(runs) if re.search(r"pip wheel .*\s\.(\s|$)", r))
    assert "GPUGATE_NATIVE=1" in runs[build]
    assert build < torch_at
    assert re.search(r"torch==(\S+)", runs[torch_at]).group(1) == _pins()["torch"] == "2.13.0"  # type: ignore[union-attr]
    assert "--index-url" in runs[torch_at]
    base = re.search(r"^FROM python:(\d+\.\d+)", text, re.M)
    assert base and base.group(1) == "3.11"  # requires-python, and Ray Client's match
    # KubeRay's default probes on Ray pods run wget.
    assert "wget" in text
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]:
        top = package.split(".")[0]  # a sub-package comes with its top-level folder
        assert f"COPY {setuptools['package-dir'].get(top, top)}/" in text, package
