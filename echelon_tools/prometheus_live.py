"""A real Prometheus (Debian's `prometheus` package) on loopback against a running
deployment: the committed scrape configurations of deploy/prometheus/ with their targets
pointed at the services' ephemeral metrics ports, and a small client of its HTTP API.

The deploy checks (tests/deploy/) and the dashboard renderer (`echelon_tools.dashboard`)
use it; nothing here changes what the configurations say besides targets and intervals.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
#: The committed configurations: the global plane's and one per organization.
GLOBAL_CONFIG = PROMETHEUS_DIR / "global.yml"


def organization_config(boundary: str) -> Path:
    return PROMETHEUS_DIR / f"organization-{boundary}.yml"


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its API answered with an error; the message says which."""


def free_port() -> int:
    """A port the OS has just handed out on loopback (Prometheus cannot report port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def live_config(config: Path, targets: Mapping[str, str], interval_s: float) -> str:
    """`config`'s text with each job's targets replaced by `targets[job]` (HOST:PORT) and
    the scrape and evaluation intervals set to `interval_s`.

    Raises:
        PrometheusError: a job of `targets` is not in `config`, or has no static targets.
    """
    text = config.read_text()
    for job, target in targets.items():
        pattern = re.compile(
            rf"(- job_name: {re.escape(job)}\n(?:[ \t]+.*\n)*?[ \t]+- targets: )\[[^\]]*\]"
        )
        text, count = pattern.subn(rf'\g<1>["{target}"]', text)
        if count != 1:
            raise PrometheusError(f"{config}: job {job!r} with static targets: found {count}")
    interval = f"{interval_s:g}s"
    text = re.sub(r"(scrape_interval|evaluation_interval): \S+", rf"\1: {interval}", text)
    return text


@dataclass
class PrometheusServer:
    """One Prometheus process; `stop()` ends it."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def api(self) -> PrometheusAPI:
        return PrometheusAPI(self.url)


def start_prometheus(
    name: str,
    config: Path,
    targets: Mapping[str, str],
    work_dir: Path,
    *,
    interval_s: float = 1.0,
    timeout_s: float = 30.0,
) -> PrometheusServer:
    """Starts Prometheus on loopback with `config` (its rules beside it) pointed at
    `targets`; returns once it answers as ready.

    Raises:
        PrometheusError: no `prometheus` binary, or it exited or was not ready in time.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError("no prometheus binary on PATH (tools/install_prometheus.sh)")
    home = work_dir / name
    home.mkdir(parents=True, exist_ok=True)
    rules = config.parent / "rules"
    if rules.is_dir():
        shutil.copytree(rules, home / "rules", dirs_exist_ok=True)
    live = home / config.name
    live.write_text(live_config(config, targets, interval_s))
    port = free_port()
    log_path = home / "prometheus.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={live}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=home,
        )
    server = PrometheusServer(name, process, f"http://127.0.0.1:{port}", log_path)
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise PrometheusError(
                f"prometheus {name} exited with {process.returncode}: "
                f"{log_path.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    server.stop()
    raise PrometheusError(f"prometheus {name} not ready within {timeout_s:g} s; see {log_path}")


class PrometheusAPI:
    """The few calls of Prometheus' HTTP API (v1) that the checks and the renderer need."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        address = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(address, timeout=self.timeout_s) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector's series; [] when none)."""
        data = self._get("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        data = self._get(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s:g}"
        )
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("targets")["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (alerting and recording) with its group's name."""
        out = []
        for group in self._get("rules")["groups"]:
            for rule in group["rules"]:
                out.append({**rule, "group": group["name"]})
        return out
