"""`make demo-docker`: the multi-site demo of `make demo`, with every service in its own
container (docker-compose.yml beside this file) instead of processes on loopback.

Prepares the corpus and the base model as `make demo` does (cached in .cache), brings up
the audit log, hands its verifier key to the others, brings up the coordinator, both
organizations and the three Prometheus servers, follows the run from the global plane
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
from pathlib import Path

from echelon.tomlconfig import load_toml

HERE = Path(__file__).resolve().parent
COMPOSE_FILE = HERE / "docker-compose.yml"
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
    key = compose.run("exec", "-T", "audit-log", "cat", "log.vkey", capture=True).strip()
    compose.env["AUDIT_LOG_KEY"] = key
    print(f"  audit log verifier key: {key}")
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
    env.update(CORPUS_DIR=str(corpus), BASE_MODEL_DIR=str(base), AUDIT_LOG_KEY="")
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
