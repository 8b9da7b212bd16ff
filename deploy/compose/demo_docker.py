"""`make demo-docker`: the multi-site demo of `make demo`, with every service in its own
container (docker-compose.yml beside this file) instead of processes on loopback.

Prepares the corpus and the base model as `make demo` does (cached in .cache), provisions
the federation on the host as `make demo` does (one kit per party and the operator's, for
the model the agents will load and the run config/coordinator.toml declares; each kit is
mounted into its party's container, so every channel is mTLS under the signed manifest),
brings up the audit log, the coordinator, both organizations and the three Prometheus
servers, follows the run from the global plane
until its windows are done, stops every service, prints the same summary as `make demo`
(audit verify, held-out losses, exported adapter, sample) from the stopped deployment's
volumes, and tears everything down, also when a step fails. Needs the images
(`make image`) and DOCKER_HOST pointing at an engine (`make docker-engine`).

    .venv/bin/python deploy/compose/demo_docker.py [--out var/demo-docker] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from echelon.tomlconfig import dumps, load_toml

HERE = Path(__file__).resolve().parent
COMPOSE_FILE = HERE / "docker-compose.yml"
CONFIG = HERE / "config"
BOUNDARIES = ("org-a", "org-b")
# The image's user (deploy/docker/Dockerfile: USER 10001:10001), who must own the kits:
# a kit's directory and private keys are private to their owner (0700, 0600).
IMAGE_UID = 10001
AGENTS = ("org-a-agent", "org-b-agent")
# Order of `docker-compose stop`: the agents first (their last audit appends need the
# global plane), then the coordinator, then the audit log, as `make demo` stops them.
STOP_ORDER = (*AGENTS, "coordinator", "audit-log")
PRETRAIN_STEPS = 300  # echelon demo's default, so that both demos share .cache/base-model-300
_TOKENS = (
    "import grpc\n"
    "from echelon_proto.boundary.v1 import boundary_pb2, boundary_pb2_grpc\n"
    "from services.common.wire import new_ref\n"
    "with grpc.insecure_channel('127.0.0.1:50053') as channel:\n"
    "    stub = boundary_pb2_grpc.BoundaryAgentStub(channel)\n"
    "    request = boundary_pb2.GetStatusRequest(ref=new_ref(0))\n"
    "    print(stub.GetStatus(request, timeout=5).tokens_total)\n"
)


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where to look."""


class Compose:
    """docker-compose on this file under one project name, with the run's variables."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        self.base = ["docker-compose", "--project-name", project, "-f", str(COMPOSE_FILE)]
        self.env = env

    def run(
        self, *args: str, capture: bool = False, check: bool = True, quiet: bool = False
    ) -> str:
        done = subprocess.run(
            [*self.base, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.DEVNULL if quiet else None,
            text=True,
        )
        if check and done.returncode != 0:
            raise DemoError(f"docker-compose {' '.join(args)} exited with {done.returncode}")
        return done.stdout or ""

    def container(self, service: str) -> str:
        cid = self.run("ps", "-q", service, capture=True).strip()
        if not cid:
            raise DemoError(f"{service}: no container")
        return cid

    def inspect(self, service: str, template: str) -> str:
        done = subprocess.run(
            ["docker", "inspect", "--format", template, self.container(service)],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def wait_healthy(self, services: Sequence[str], timeout_s: float) -> None:
        give_up = time.monotonic() + timeout_s
        waiting = list(services)
        while waiting:
            for service in list(waiting):
                state = self.inspect(service, "{{.State.Status}} {{.State.Health.Status}}")
                if state.startswith("exited") or state.startswith("dead"):
                    raise DemoError(f"{service} exited: docker-compose logs {service}")
                if state.endswith(" healthy"):
                    waiting.remove(service)
            if waiting and time.monotonic() > give_up:
                raise DemoError(f"not healthy within {timeout_s:.0f}s: {', '.join(waiting)}")
            if waiting:
                time.sleep(2.0)


def prepare(cache: Path, seq_len: int) -> tuple[Path, Path]:
    """The corpus and the base model, as `make demo` makes them (cached in `cache`)."""
    from echelon_tools import demo

    print("corpus:")
    paths = demo._corpus(cache / "corpus", 4 << 20)
    print("base model: a tiny Llama pretrained on public text (Python stdlib docstrings):")
    options = argparse.Namespace(cache=cache, pretrain_steps=PRETRAIN_STEPS, seq_len=seq_len)
    return (cache / "corpus").resolve(), demo._base_model(options, paths)


def publish(model: Path, out: Path) -> Path:
    """A copy of the base model that the containers' user can read: the pretraining writes
    its weights private to their owner, and the model is public to every organization."""
    shutil.copytree(model, out)
    for path in (out, *out.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out.resolve()


def _on_host(value: Any, paths: dict[str, str]) -> Any:
    """`value` (a TOML table, list or value) with each container path in `paths` replaced by
    its host path."""
    if isinstance(value, dict):
        return {k: _on_host(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_host(v, paths) for v in value]
    if isinstance(value, str):
        for inside, outside in paths.items():
            if value == inside or value.startswith(inside + "/"):
                return outside + value[len(inside) :]
    return value


def provision_kits(out: Path, corpus: Path, model: Path) -> Path:
    """The federation of this deployment in `out/kits`, one kit per party (coordinator,
    audit log, both organizations) and the operator's (an auditor: the watcher and the
    summary read as it). The manifest names the model identity org-a's agent computes from
    its own configuration (with the host's paths for the same corpus and model: the digests
    are of the contents) and the declaration config/coordinator.toml makes. Each party's
    kit is handed to the image's user; the root key and CA key stay the caller's."""
    from echelon_tools.launcher import OPERATOR
    from echelon_tools.provision import (
        FederationSpec,
        agent_model,
        coordinator_declaration,
        provision,
    )

    work = out / "provision"
    work.mkdir(parents=True)
    host = {"/srv/corpus": str(corpus), "/srv/model": str(model)}
    agent = _on_host(load_toml(CONFIG / f"{BOUNDARIES[0]}.toml"), host)
    agent["service"]["data_dir"] = str(work / BOUNDARIES[0])
    (work / "agent.toml").write_text(dumps(agent))
    try:
        identity = agent_model(work / "agent.toml")
    except RuntimeError as exc:
        raise DemoError(f"the model identity for the manifest: {exc}") from None
    kits = out / "kits"
    signed = provision(
        FederationSpec(
            declaration=coordinator_declaration(CONFIG / "coordinator.toml", identity),
            boundaries=BOUNDARIES,
            auditors=(OPERATOR,),
        ),
        kits,
        now=datetime.now(UTC),
    )
    for party in signed.manifest.parties:
        for path in (kits / party.party_id, *(kits / party.party_id).iterdir()):
            try:
                os.chown(path, IMAGE_UID, IMAGE_UID)
            except PermissionError:
                raise DemoError(
                    f"{path}: cannot hand it to the image's user {IMAGE_UID}, want to run "
                    "as root (as the docker engine does)"
                ) from None
    # The kits' folder is root's alone: the engine (root) bind-mounts each kit, and no other
    # account on this host, whatever its uid, reaches a key through it.
    kits.chmod(0o700)
    shutil.rmtree(work)
    print(
        f"  manifest: run {signed.run_id} version {signed.version}, parties "
        + ", ".join(p.party_id for p in signed.manifest.parties)
    )
    return kits.resolve()


def tokens_trained(compose: Compose) -> int:
    """The agents' token counts, each asked inside its own container (its status port
    listens on its loopback only)."""
    total = 0
    for agent in AGENTS:
        total += int(compose.run("exec", "-T", agent, "python", "-c", _TOKENS, capture=True))
    return total


PROMETHEUS = ("prometheus-global", "prometheus-org-a", "prometheus-org-b")
_TARGETS = (
    "import json, urllib.request\n"
    "url = 'http://127.0.0.1:9090/api/v1/targets?state=active'\n"
    "reply = json.load(urllib.request.urlopen(url, timeout=5))\n"
    "for t in reply['data']['activeTargets']:\n"
    "    print(t['scrapeUrl'], t['health'], t['lastError'] or '-')\n"
)


def scraped(compose: Compose) -> bool:
    """Whether each Prometheus scrapes its targets (each asked inside its own container, on
    its own network): the global plane's the coordinator and the audit log, each
    organization's its own agent. Prints one line per target."""
    healthy = True
    for service in PROMETHEUS:
        text = compose.run("exec", "-T", service, "python3", "-c", _TARGETS, capture=True)
        for line in text.splitlines() or ["(no targets) - -"]:
            url, health, error = line.split(" ", 2)
            healthy = healthy and health == "up"
            shown = "" if error == "-" else f" ({error})"
            print(f"  {service:<18} {url:<40} {health}{shown}")
    return healthy


def save_logs(compose: Compose, out: Path) -> None:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for service in (*STOP_ORDER, *PROMETHEUS):
        text = compose.run("logs", "--no-color", service, capture=True, check=False)
        (logs / f"{service}.log").write_text(text)


def run(compose: Compose, out: Path, windows: int) -> int:
    started = time.monotonic()
    print("starting the audit log ...")
    compose.run("up", "-d", "--quiet-pull", "audit-log")
    compose.wait_healthy(["audit-log"], 120)
    print("starting the coordinator, org-a, org-b and three Prometheus servers ...")
    compose.run("up", "-d", "--quiet-pull")
    compose.wait_healthy([*AGENTS], 600)
    print(f"  both agents attached in {time.monotonic() - started:.0f}s; following the run:")
    compose.run(
        "run",
        "--rm",
        "-T",
        "demo-watch",
        "python",
        "/opt/echelon-demo/watch.py",
        "--out",
        "/var/lib/echelon",
        "--windows",
        str(windows),
    )
    tokens = tokens_trained(compose)
    print("\nPrometheus targets (each Prometheus on its own network):")
    targets_up = scraped(compose)
    print("\nstopping services ...")
    for service in STOP_ORDER:
        compose.run("stop", service, capture=True)
    codes = {s: compose.inspect(s, "{{.State.ExitCode}}") for s in STOP_ORDER}
    print("  exit codes: " + ", ".join(f"{s}={c}" for s, c in codes.items()))
    save_logs(compose, out)
    summary = subprocess.run(
        [
            *compose.base,
            "run",
            "--rm",
            "-T",
            "demo-summary",
            "python",
            "/opt/echelon-demo/summary.py",
            "--out",
            "/var/lib/echelon",
            "--tokens",
            str(tokens),
        ],
        env=compose.env,
        stdin=subprocess.DEVNULL,
    )
    copied = subprocess.run(
        [
            *compose.base,
            "run",
            "--rm",
            "-T",
            "--entrypoint",
            "tar",
            "demo-summary",
            "-C",
            "/var/lib/echelon",
            "-cf",
            "-",
            "export",
            "audit-report.json",
        ],
        env=compose.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    if copied.returncode == 0:
        subprocess.run(["tar", "-C", str(out), "-xf", "-"], input=copied.stdout, check=True)
    print(f"logs, audit report and exported adapter in {out}")
    if any(code != "0" for code in codes.values()):
        return 1
    if not targets_up:
        print("demo-docker: a Prometheus target was down (see above)")
        return 1
    return summary.returncode


def _terminated(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo_docker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, default=Path("var/demo-docker"))
    parser.add_argument("--project", default="echelon-demo", help="compose project name")
    parser.add_argument("--keep", action="store_true", help="leave the deployment up")
    args = parser.parse_args(argv)
    started = time.monotonic()
    # A SIGTERM (a CI job's timeout, `kill`) tears the deployment down too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _terminated)
    run_config = load_toml(HERE / "config" / "coordinator.toml")
    windows = int(run_config["coordinator"]["windows"])
    print("Echelon demo in containers: 2 organizations x 2 devices, coordinator, audit log,")
    print("a Prometheus per organization and one for the global plane (docker-compose)")
    corpus, base = prepare(args.cache, int(run_config["inner"]["seq_len"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHELON_")}
    compose = Compose(args.project, env)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    base = publish(base, args.out / "base-model")
    print("federation: one kit per party (mTLS, the signed manifest):")
    try:
        kits = provision_kits(args.out, corpus, base)
    except DemoError as exc:
        print(f"\ndemo-docker failed: {exc}")
        return 1
    env.update(CORPUS_DIR=str(corpus), BASE_MODEL_DIR=str(base), KITS_DIR=str(kits))
    compose.run("down", "--volumes", "--remove-orphans", capture=True, check=False, quiet=True)
    try:
        return run(compose, args.out, windows)
    except (DemoError, subprocess.CalledProcessError) as exc:
        print(f"\ndemo-docker failed: {exc}")
        save_logs(compose, args.out)
        print(f"service logs in {args.out / 'logs'}")
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        if args.keep:
            print(f"left up: docker-compose -p {args.project} -f {COMPOSE_FILE} down --volumes")
        else:
            print("tearing down (containers, networks, volumes) ...")
            compose.run(
                "down", "--volumes", "--remove-orphans", capture=True, check=False, quiet=True
            )
        print(f"demo-docker: {time.monotonic() - started:.0f}s in all")


if __name__ == "__main__":
    sys.exit(main())
