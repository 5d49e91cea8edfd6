"""deploy/kuberay against the schemas the API server would apply, with no cluster here.

The RayService is checked against KubeRay v1.7.0's CRD (shared/schemas) with unknown
fields made errors, as kubectl's strict field validation makes them, plus the checks
KubeRay's operator runs on a RayService before it acts on it. The Kubernetes objects
beside it are checked against the core schemas that CRD embeds (Service, PodSpec,
PersistentVolumeClaimSpec, NetworkPolicy rules, LabelSelector); the
PodDisruptionBudget's few fields, the Secrets and the metadata by hand. CEL rules
(x-kubernetes-validations) and server-side defaulting are not applied.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from packaging.version import Version

from tests.unit.deploy import kuberay as k

if not k.SCHEMAS.is_dir():  # pragma: no cover - the workplace lays shared/ beside the checkout
    message = f"KubeRay CRD schemas not found at {k.SCHEMAS} (set GPUGATE_KUBERAY_SCHEMAS)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

API_VERSIONS = {
    "ConfigMap": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PersistentVolumeClaim": "v1",
    "Pod": "v1",
    "PodDisruptionBudget": "policy/v1",
    "RayService": "ray.io/v1",
    "Secret": "v1",
    "Service": "v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}


def test_every_document_has_a_known_kind_and_valid_metadata() -> None:
    for name, doc in k.FILES:
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec", "type", "stringData"}, name
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], (name, doc["kind"])
        rule = k.DNS_LABEL if doc["kind"] == "Service" else k.DNS_SUBDOMAIN
        assert k.metadata_errors(doc["metadata"], name_rule=rule) == [], name
        assert "namespace" not in doc["metadata"], "applied to the current namespace"


def test_the_rayservice_matches_the_crd_with_unknown_fields_as_errors() -> None:
    rs = k.rayservice()
    assert k.schema_errors(k.crd_schema("RayService"), rs) == []
    # Its cluster is a valid RayCluster spec too (the CRD KubeRay creates from it).
    cluster_spec = k.at(k.crd_schema("RayCluster"), "spec")
    assert k.schema_errors(cluster_spec, k.cluster()) == []


GATEWAY = ("spec", "rayClusterConfig", "workerGroupSpecs", 0)
RAY_CONTAINER = (*GATEWAY, "template", "spec", "containers", 0)


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (("spec",), "serveConfig"),  # the v1alpha1 name
        (("spec", "rayClusterConfig"), "gcsFaultTolerance"),
        (GATEWAY, "minReplica"),
        (RAY_CONTAINER, "livenessprobe"),
        ((*RAY_CONTAINER, "readinessProbe", "grpc"), "serviceName"),
    ],
)
def test_the_check_refuses_a_field_the_crd_does_not_have(path: tuple[Any, ...], key: str) -> None:
    broken = k.mutated(k.rayservice(), path, key, "x")
    errors = k.schema_errors(k.crd_schema("RayService"), broken)
    assert any(key in e and "Additional properties" in e for e in errors), errors


def test_the_check_refuses_a_wrong_type_and_a_bad_enum() -> None:
    rs = k.rayservice()
    schema = k.crd_schema("RayService")
    wrong = k.mutated(rs, GATEWAY, "replicas", "3")
    assert k.schema_errors(schema, wrong)
    mode = k.mutated(rs, ("spec", "rayClusterConfig", "authOptions"), "mode", "on")
    assert any("authOptions.mode" in e for e in k.schema_errors(schema, mode))


def kuberay_refusals(rs: dict[str, Any]) -> list[str]:
    """The parts of ValidateRayServiceSpec / ValidateRayClusterSpec (KubeRay v1.7.0,
    ray-operator/controllers/ray/utils/validation.go) that apply to this manifest."""
    spec, cluster_spec = rs["spec"], rs["spec"]["rayClusterConfig"]
    errors = []
    autoscaling = cluster_spec.get("enableInTreeAutoscaling", False)
    head_spec = cluster_spec["headGroupSpec"]
    groups = [("head", head_spec)] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    for name, g in groups:
        if not g["template"]["spec"]["containers"]:
            errors.append(f"{name}: no container")
        params = g.get("rayStartParams", {})
        if g.get("resources") and any(
            params.get(p) for p in ("num-cpus", "num-gpus", "memory", "resources")
        ):
            errors.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams labels")
        if name != "head":
            if not autoscaling and ("minReplicas" not in g or "maxReplicas" not in g):
                errors.append(f"{name}: min/maxReplicas required without autoscaling")
            if not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
                errors.append(f"{name}: replicas outside min..max")
    head_env = {e["name"] for e in head_spec["template"]["spec"]["containers"][0].get("env", [])}
    if "gcsFaultToleranceOptions" in cluster_spec:
        if head_spec.get("rayStartParams", {}).get("redis-password"):
            errors.append("redis-password in rayStartParams with GCS FT options")
        if head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"}:
            errors.append("REDIS_PASSWORD / RAY_REDIS_ADDRESS env with GCS FT options")
        if "ray.io/ft-enabled" in rs["metadata"].get("annotations", {}):
            errors.append("ft-enabled annotation and GCS FT options")
    elif "RAY_REDIS_ADDRESS" in head_env:
        errors.append("RAY_REDIS_ADDRESS without GCS FT options")
    if head_env & {"REDIS_USERNAME"}:
        errors.append("REDIS_USERNAME env")
    auth = cluster_spec.get("authOptions", {})
    token = auth.get("mode") == "token"
    if token and Version(cluster_spec.get("rayVersion", "0")) < Version("2.52.0"):
        errors.append("token auth needs Ray >= 2.52.0")
    if auth.get("enableK8sTokenAuth"):
        errors.append("K8s token auth is not supported for a RayService")
    for gated in ("networkPolicy", "tlsOptions", "historyServerOptions"):
        if gated in cluster_spec:
            errors.append(f"{gated} needs an operator feature gate")
    if head_spec.get("headService", {}).get("metadata", {}).get("name"):
        errors.append("headService name set")
    upgrade = spec.get("upgradeStrategy", {}).get("type")
    if upgrade not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
        errors.append(f"upgradeStrategy {upgrade}")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("negative rayClusterDeletionDelaySeconds")
    return errors


def test_kuberay_would_accept_the_rayservice() -> None:
    assert kuberay_refusals(k.rayservice()) == []
    # and the check notices what KubeRay refuses
    bad = k.mutated(
        k.rayservice(),
        ("spec", "rayClusterConfig", "headGroupSpec"),
        "rayStartParams",
        {"num-cpus": "0"},
    )
    assert kuberay_refusals(bad) == ["head: resources in both rayStartParams and resources"]


def test_services_match_the_core_service_schema() -> None:
    schema = k.core_schema("Service")
    for svc in k.all_of("Service"):
        assert k.schema_errors(schema, svc) == [], svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert 1 <= p["port"] <= 65535 and k.DNS_LABEL.fullmatch(p["name"])
    # KubeRay's own Serve Service, as the RayService declares it
    assert k.schema_errors(schema, k.rayservice()["spec"]["serveService"]) == []


def test_the_network_policies_match_the_core_schemas() -> None:
    for policy in k.all_of("NetworkPolicy"):
        spec = policy["spec"]
        name = policy["metadata"]["name"]
        assert set(spec) <= {"podSelector", "policyTypes", "ingress", "egress"}, name
        assert k.schema_errors(k.core_schema("LabelSelector"), spec["podSelector"]) == []
        assert spec["policyTypes"] and set(spec["policyTypes"]) <= {"Ingress", "Egress"}
        for rule in spec.get("ingress", []):
            assert k.schema_errors(k.core_schema("NetworkPolicyIngressRule"), rule) == [], name
        for rule in spec.get("egress", []):
            assert k.schema_errors(k.core_schema("NetworkPolicyEgressRule"), rule) == [], name
        # rules only for the directions the policy covers
        assert ("ingress" in spec) == ("Ingress" in spec["policyTypes"]), name
        assert ("egress" in spec) == ("Egress" in spec["policyTypes"]), name


def test_the_disruption_budget_has_only_policy_v1_fields() -> None:
    pdb = k.one("PodDisruptionBudget")["spec"]
    fields = {"minAvailable", "maxUnavailable", "selector", "unhealthyPodEvictionPolicy"}
    assert set(pdb) <= fields
    assert ("minAvailable" in pdb) != ("maxUnavailable" in pdb)
    assert pdb.get("unhealthyPodEvictionPolicy") in (None, "IfHealthyBudget", "AlwaysAllow")
    assert k.schema_errors(k.core_schema("LabelSelector"), pdb["selector"]) == []


def test_the_volume_claim_and_the_loader_pod_match_the_core_schemas() -> None:
    pvc = k.one("PersistentVolumeClaim")
    assert k.schema_errors(k.core_schema("PersistentVolumeClaimSpec"), pvc["spec"]) == []
    pod = k.one("Pod")
    assert k.schema_errors(k.core_schema("PodSpec"), pod["spec"]) == []


def test_the_example_secrets_hold_strings_only() -> None:
    for secret in k.all_of("Secret"):
        assert secret["type"] == "Opaque"
        assert set(secret) == {"apiVersion", "kind", "metadata", "type", "stringData"}
        for key, value in secret["stringData"].items():
            assert isinstance(value, str) and value, key
            assert all(c.isalnum() or c in "-._" for c in key), key
