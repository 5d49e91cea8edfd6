"""deploy/kuberay and deploy/Dockerfile: the manifests agree with how gpugate runs.

No Kubernetes here: these tests parse every manifest and check what can drift silently
from the code: the config, where the gateways and the control loop can land and what
the Services, the disruption budget and the network policies select, which pods hold
the secrets, ports and probes, grace periods against the drain timeout, the state
volume, GPU sizing and the versions pinned in the image. The schemas are checked in
test_kuberay_schemas.py, serveConfigV2 in test_kuberay_serve_config.py.
"""

from __future__ import annotations

import re
import tomllib

from router.health import SERVER_NAMES
from serving.cli.serve import FIRST_PASS_TIMEOUT_S
from serving.config import load_config
from serving.gateway.app import REFUSAL_LINGER_S
from tests.unit.deploy import kuberay as k

FILES = {
    "00-storage.yaml",
    "01-secrets.example.yaml",
    "02-rayservice.yaml",
    "03-services.yaml",
    "04-disruption-budget.yaml",
    "05-network-policies.yaml",
    "06-servicemonitor.yaml",
    "artifact-loader.yaml",
}
# The variables that carry secrets; only the head and the gateway pods may have them.
SECRET_ENV = {"GPUGATE_DATABASE_URL", "GPUGATE_CLUSTER_SECRET"}
PRESTOP_S = 10
# Ray gives the head node this resource (and no other node).
HEAD_RESOURCES = {"node:__internal_head__"}
# How long Serve takes to start a gateway in place of one that drained (measured: 10-20 s
# on a 2-core machine), with room to spare.
GATEWAY_RESTART_S = 60


def test_the_files_are_the_documented_ones() -> None:
    assert {name for name, _ in k.FILES} == FILES
    readme = (k.KUBERAY / "README.md").read_text()
    for name in FILES | {"config/gpugate.yaml", "render_serve_config.py"}:
        assert f"`{name}`" in readme, name


def test_the_config_is_one_gpugate_accepts() -> None:
    config = load_config(k.CONFIG)  # unknown keys are errors
    assert config.server.host == "0.0.0.0", "the Services reach the gateways on the pod IP"
    # On a cluster the state database is PostgreSQL from the pods' environment, never
    # SQLite on a volume several pods write; the state folder is the mounted volume.
    assert config.database_url is None and config.state_dir is None
    assert config.models, "the example config serves a GPU model"
    assert config.server.gateway_replicas == 2


# ------------------------------------------- where the gateways and the control run


def gateway_group() -> k.Doc:
    """The worker group that advertises the gateways' custom resources."""
    wanted = k.served_config().server.gateway_resources
    assert wanted, "a cluster pins the gateways (server.gateway_resources)"
    groups = [
        g
        for g in k.cluster()["workerGroupSpecs"]
        if all(k.ray_resources(g).get(name, 0) >= amount for name, amount in wanted.items())
    ]
    assert len(groups) == 1, [g["groupName"] for g in groups]
    return groups[0]


def test_one_gateway_per_gateway_pod_and_the_control_loop_on_the_head() -> None:
    server = k.served_config().server
    gateways, wanted = k.placement()["gateway"]
    assert (gateways, wanted) == (server.gateway_replicas, server.gateway_resources)
    g = gateway_group()
    # A pod with room for two could hold both gateways: no high availability.
    per_pod = min(k.ray_resources(g)[n] // amount for n, amount in wanted.items())
    assert per_pod == 1
    assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == gateways
    assert gateways >= 2, "one gateway serves while the other's pod moves"
    # Nothing else advertises the gateways' resources.
    others = [k.head(), *(x for x in k.cluster()["workerGroupSpecs"] if x is not g)]
    assert all(not set(k.ray_resources(x)) & set(wanted) for x in others)
    # The control loop asks for what only the head has (Ray's own resource of the head
    # node), so it takes no gateway's pod and runs where the secrets are.
    _, control = k.placement()["control"]
    assert set(control) <= HEAD_RESOURCES | set(k.ray_resources(k.head())), control


def test_no_model_replica_can_land_on_a_pod_that_holds_the_secrets() -> None:
    # Model replicas always reserve CPUs; the head and the gateway pods advertise none.
    assert k.ray_cpus(k.head()) == 0 and k.ray_cpus(gateway_group()) == 0
    assert all(m.num_cpus > 0 for m in k.served_config().models)
    assert k.served_config().models == load_config(k.CONFIG).models


# ------------------------------------------------------------ secrets and identity


def gpugate_env_names(group_name: str) -> set[str]:
    return set(k.env(k.container(k.pod_specs()[group_name])))


def test_only_the_head_and_the_gateway_pods_get_the_secrets() -> None:
    tenant_vars = {t.api_key_env for t in k.served_config().tenants}
    head_env = k.env(k.container(k.pod_specs()["head"]))
    gateway_env = k.env(k.container(gateway_group()["template"]["spec"]))
    # Serve's builder reads them on the head; the same set on the gateway pods.
    assert SECRET_ENV | tenant_vars <= set(head_env)
    assert head_env == gateway_env
    for name, spec in k.pod_specs().items():
        if name in ("head", gateway_group()["groupName"]):
            continue
        refs = [v for key, v in k.walk(spec) if key in ("secretKeyRef", "secret", "envFrom")]
        assert refs == [], f"{name} runs model code: no Secret there"
        assert not {e for e in gpugate_env_names(name) if e.startswith("GPUGATE_")}, name


def test_every_variable_is_one_that_something_reads() -> None:
    source = "\n".join(p.read_text() for p in (k.ROOT / "serving").rglob("*.py"))
    read = set(re.findall(r"(?:environ|env)(?:\.get)?[\[(]\"([A-Z][A-Z0-9_]+)\"", source))
    assert read >= SECRET_ENV, "serving.gateway.bootstrap and serving.dataplane read them"
    tenant_vars = {t.api_key_env for t in k.served_config().tenants}
    for name in gpugate_env_names("head") | gpugate_env_names(gateway_group()["groupName"]):
        # serving.gateway.telemetry.otel_env hands OTEL_* to the gateways
        assert name in read or name in tenant_vars or name.startswith("OTEL_"), name
    # KubeRay sets Ray's token variables from authOptions; none is set by hand.
    for name in k.pod_specs():
        assert not {e for e in gpugate_env_names(name) if e.startswith("RAY_")}, name


def test_secret_references_resolve_to_the_example_secrets() -> None:
    secrets = {d["metadata"]["name"]: d["stringData"] for d in k.all_of("Secret")}
    refs = [v for key, v in k.walk(k.rayservice()) if key == "secretKeyRef"]
    assert refs
    for ref in refs:
        assert ref["key"] in secrets[ref["name"]], ref
    env = k.env(k.container(k.pod_specs()["head"]))
    db = env["GPUGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert secrets[db["name"]][db["key"]].startswith("postgresql+psycopg://")
    auth = k.cluster()["authOptions"]
    assert auth == {"mode": "token", "secretName": "gpugate-ray-auth"}
    assert "auth_token" in secrets[auth["secretName"]]  # the key KubeRay reads
    redis = k.cluster()["gcsFaultToleranceOptions"]
    assert redis["redisAddress"] and "backend" not in redis  # redis, the default
    assert redis["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "gpugate-redis"


# ------------------------------------------------------ ports, Services, probes


def test_gateway_container_ports_are_the_configured_ones() -> None:
    server = k.served_config().server
    c = k.container(gateway_group()["template"]["spec"])
    assert k.ports(c) == {
        "http": server.http_port,
        "grpc": server.grpc_port,
        "metrics": server.metrics_port,  # + the gateway's rank on its node: 0, one per pod
    }
    assert (server.http_port, server.grpc_port, server.metrics_port) == (8000, 8001, 8002)


def gateway_pod_labels() -> dict[str, str]:
    return k.pod_labels(gateway_group()["groupName"])


def test_services_select_the_gateway_pods_only_and_target_their_ports() -> None:
    server = k.served_config().server
    for svc in k.all_of("Service"):
        selector = svc["spec"]["selector"]
        assert k.matches(selector, gateway_pod_labels()), svc["metadata"]["name"]
        for other in ["head", *(g["groupName"] for g in k.cluster()["workerGroupSpecs"])]:
            if other != gateway_group()["groupName"]:
                assert not k.matches(selector, k.pod_labels(other)), other
        # a RayService's RayCluster has a generated name, and two during an upgrade
        assert "ray.io/cluster" not in selector
        container_ports = k.ports(k.container(gateway_group()["template"]["spec"]))
        for p in svc["spec"]["ports"]:
            assert p["port"] == container_ports[p["targetPort"]], "the documented numbers"
    client = {p["name"]: p["port"] for p in k.one("Service", "gpugate")["spec"]["ports"]}
    assert client == {"http": server.http_port, "grpc": server.grpc_port}
    metrics = k.one("Service", "gpugate-metrics")
    assert [p["port"] for p in metrics["spec"]["ports"]] == [server.metrics_port]
    assert metrics["metadata"]["annotations"]["prometheus.io/port"] == str(server.metrics_port)
    assert metrics["spec"]["publishNotReadyAddresses"] is True, "scraped while it drains"
    monitor = k.one("ServiceMonitor")
    assert k.matches(monitor["spec"]["selector"], metrics["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}


def test_kuberays_own_serve_service_reaches_nothing() -> None:
    spec = k.rayservice()["spec"]
    # KubeRay forces its selector to every worker pod (GPU pods included): no ports.
    assert spec["serveService"]["spec"] == {"clusterIP": "None"}
    assert spec["excludeHeadPodFromServeSvc"] is True
    head_ports = k.ports(k.container(k.pod_specs()["head"]))
    assert not any(n == "serve" or n.startswith("serve-") for n in head_ports)


def window_s(probe: k.Doc) -> int:
    """How long a probe fails before it acts."""
    return int(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))


def test_gateway_probes_are_the_grpc_health_check_of_the_server() -> None:
    server = k.served_config().server
    c = k.container(gateway_group()["template"]["spec"])
    probes = {kind: c[kind] for kind in ("readinessProbe", "startupProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["grpc"]["port"] == server.grpc_port
        assert probe["grpc"].get("service", "") in SERVER_NAMES
    assert server.tls is None, "Kubernetes' grpc probes speak no TLS"
    # Out of the endpoints within seconds of a drain's start.
    assert window_s(probes["readinessProbe"]) <= 15
    # A cold start waits for the control loop's first pass (as `gpugate serve` does).
    assert window_s(probes["startupProbe"]) >= FIRST_PASS_TIMEOUT_S
    # Serve replacing the pod's gateway (a rolling update) is no reason to restart it.
    drain_and_restart = server.drain_timeout_s + REFUSAL_LINGER_S + GATEWAY_RESTART_S
    assert window_s(probes["livenessProbe"]) >= drain_and_restart


def test_gpu_pods_are_ready_on_the_ray_nodes_health() -> None:
    for name, spec in k.pod_specs().items():
        if name in ("head", gateway_group()["groupName"]):
            continue
        # KubeRay's default readiness for a RayService worker also asks Serve's proxy,
        # which gpugate disables.
        probe = k.container(spec)["readinessProbe"]["httpGet"]
        assert probe == {"path": "/api/healthz", "port": 52365}, name


def test_grace_periods_cover_the_drain() -> None:
    drain = k.served_config().server.drain_timeout_s
    spec = gateway_group()["template"]["spec"]
    pre_stop = k.container(spec)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["sleep", str(PRESTOP_S)]
    assert spec["terminationGracePeriodSeconds"] >= drain + PRESTOP_S


# ------------------------------------------------ disruption budget, network policy


def test_the_disruption_budget_keeps_one_gateway_pod() -> None:
    pdb = k.one("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1 < k.served_config().server.gateway_replicas
    assert k.matches(pdb["selector"], gateway_pod_labels())
    for other in ("head", "gpu"):
        assert not k.matches(pdb["selector"], k.pod_labels(other))
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def policy(name: str) -> k.Doc:
    spec: k.Doc = k.one("NetworkPolicy", name)["spec"]
    return spec


def ray_pod_peer(peer: k.Doc) -> bool:
    """Whether a policy peer selects exactly this RayService's Ray pods."""
    if set(peer) != {"podSelector"}:
        return False
    selector = peer["podSelector"]
    ray_pods = [k.pod_labels(n) for n in k.pod_specs()]
    loader = k.one("Pod")["metadata"]["labels"]
    return all(k.matches(selector, labels) for labels in ray_pods) and not k.matches(
        selector, loader
    )


def test_only_ray_pods_reach_the_gpu_pods() -> None:
    spec = policy("gpugate-gpu-workers")
    assert k.matches(spec["podSelector"], k.pod_labels("gpu"))
    assert not k.matches(spec["podSelector"], gateway_pod_labels())
    # One rule: from this RayService's Ray pods, every port (Ray's ports and the data
    # plane's are both picked by the kernel: no port rule tells them apart).
    (rule,) = spec["ingress"]
    assert [ray_pod_peer(p) for p in rule["from"]] == [True] and "ports" not in rule


def test_gpu_pods_reach_ray_pods_and_dns_only() -> None:
    spec = policy("gpugate-gpu-workers-egress")
    assert k.matches(spec["podSelector"], k.pod_labels("gpu"))
    ray, dns = spec["egress"]
    assert [ray_pod_peer(p) for p in ray["to"]] == [True] and "ports" not in ray
    assert {p["port"] for p in dns["ports"]} == {53}
    assert all("namespaceSelector" in p for p in dns["to"]), "DNS is another namespace's"


def test_clients_reach_the_gateway_pods_on_http_and_grpc_only() -> None:
    server = k.served_config().server
    spec = policy("gpugate-gateways")
    assert k.matches(spec["podSelector"], gateway_pod_labels())
    ray, clients, prometheus = spec["ingress"]
    assert [ray_pod_peer(p) for p in ray["from"]] == [True]
    assert "from" not in clients
    assert {p["port"] for p in clients["ports"]} == {server.http_port, server.grpc_port}
    assert {p["port"] for p in prometheus["ports"]} == {server.metrics_port}


# ------------------------------------------------------------ state and the GPUs


def test_state_volume_is_shared_and_mounted_where_the_builder_is_told() -> None:
    pvc = k.one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    state_dir = k.app_args()["state_dir"]
    # The builder (head) copies artifacts there, the gateways write uploads, the GPU
    # pods load from the same paths.
    for name, spec in k.pod_specs().items():
        claims = {
            v["name"]
            for v in spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        assert len(claims) == 1, name
        mounts = [m for m in k.container(spec)["volumeMounts"] if m["name"] in claims]
        assert [m["mountPath"] for m in mounts] == [state_dir], name
        assert spec["securityContext"]["fsGroup"] == 1000, "the image's uid must write it"
    for m in k.served_config().models:
        assert m.artifact.is_relative_to(state_dir), "the builder reads artifacts from the volume"
    # The image's default, so gpugate commands run in a pod find the admin token.
    dockerfile = (k.ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ENV GPUGATE_STATE_DIR={state_dir}" in dockerfile


def test_every_gpu_model_fits_a_gpu_worker_group() -> None:
    for m in k.served_config().models:
        if m.num_gpus == 0:
            continue
        fits = []
        for g in k.cluster()["workerGroupSpecs"]:
            limits = k.container(g["template"]["spec"])["resources"]["limits"]
            gpus = k.quantity(limits.get("nvidia.com/gpu", 0))
            if gpus >= m.num_gpus and k.quantity(limits["cpu"]) >= m.num_cpus:
                assert "num-gpus" not in g["rayStartParams"], "taken from the limit"
                per_pod = min(gpus // m.num_gpus, k.quantity(limits["cpu"]) // m.num_cpus)
                fits.append(per_pod * g["replicas"])  # the pods there are: no autoscaler
        # the version, at its most replicas, and a rollout's candidate beside it
        assert not k.cluster()["enableInTreeAutoscaling"]
        assert fits and max(fits) >= 2 * m.max_replicas, f"{m.name}:{m.version} has no room"


def test_images_are_one_build_with_a_cuda_variant_for_the_gpu_group() -> None:
    base = k.container(k.pod_specs()["head"])["image"]
    for name, spec in k.pod_specs().items():
        c = k.container(spec)
        gpus = k.quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        assert c["image"] == (f"{base}-cuda" if gpus else base), name
    assert k.one("Pod")["spec"]["containers"][0]["image"] == base


def test_upgrades_build_a_new_cluster() -> None:
    spec = k.rayservice()["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert spec["rayClusterDeletionDelaySeconds"] >= 0
    assert k.cluster()["enableInTreeAutoscaling"] is False


# ----------------------------------------------------------------- versions, image


def _pins() -> dict[str, str]:
    deps = tomllib.loads((k.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.match(r"([a-z\[\]]+)==([\w.]+)", d).groups() for d in deps if "==" in d)  # type: ignore[union-attr]


def test_ray_version_is_the_pinned_one() -> None:
    assert k.cluster()["rayVersion"] == _pins()["ray[serve]"]


def test_dockerfile_installs_pinned_torch_first_then_gpugate() -> None:
    text = (k.ROOT / "deploy" / "Dockerfile").read_text()
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
    assert base and base.group(1) == "3.11"  # requires-python
    # KubeRay's generated commands and the head's default probes run bash and wget.
    assert "wget" in text and "bash" in text
    setuptools = tomllib.loads((k.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]:
        top = package.split(".")[0]  # a sub-package comes with its top-level folder
        assert f"COPY {setuptools['package-dir'].get(top, top)}/" in text, package
