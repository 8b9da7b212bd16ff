"""The dashboard screenshot of a real run: starts a small multi-site deployment (an audit
log, a coordinator, two organizations of two devices each, on loopback), the global
plane's Prometheus and org-a's own (deploy/prometheus/, targets pointed at the services),
lets it train for a number of windows, renders the dashboard's queries from both
Prometheus servers (`echelon_tools.dashboard`) and photographs the page in headless
Chromium. The command that made docs/images/dashboard.png::

    python -m echelon_tools.dashboard_shot --windows 40 --png docs/images/dashboard.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from echelon.training.corpus import cached_domain
from echelon_tools.dashboard import load_queries, render, screenshot
from echelon_tools.launcher import Deployment, DeploymentSpec, Site
from echelon_tools.prometheus_live import (
    GLOBAL_CONFIG,
    PrometheusServer,
    organization_config,
    start_prometheus,
)


def lean_spec(root: Path, *, adaptive_h: bool = False) -> DeploymentSpec:
    """Two organizations of two devices each (k_min), short windows on a tiny model, no
    declared end (it runs until stopped)."""
    cache = root / "corpus"
    a = cached_domain("stdlib-a", cache, max_bytes=100_000).path
    b = cached_domain("stdlib-b", cache, max_bytes=100_000).path
    return DeploymentSpec(
        root=root / "run",
        sites=(
            Site(boundary="org-a", data_files=(a,), workers=2),
            Site(boundary="org-b", data_files=(b,), workers=2),
        ),
        tokenizer_files=(a, b),
        coordinator_tables={
            "coordinator": {
                "run_id": "prometheus-live",
                "token_unit": 1024.0,
                "adaptive_h": adaptive_h,
            },
            "window": {"inner_steps": 2 if not adaptive_h else 8, "deadline_s": 120.0},
            "inner": {"lr": 0.005, "batch_size": 2, "seq_len": 32},
            "secagg": {"level1": False, "level2": True},
        },
        agent_tables={
            "data": {"seq_len": 32, "max_tokens_per_file": 10_000},
            "tokenizer": {"vocab_size": 512},
            "inner": {"batch_size": 2, "seq_len": 32, "warmup_steps": 1, "total_steps": 1000},
            "devices": {"eval_batches": 1, "eval_every": 1},
        },
    )


def metrics_target(deployment: Deployment, name: str) -> str:
    return f"127.0.0.1:{deployment.services[name].ports['metrics']}"


def start_planes(
    deployment: Deployment, work: Path, interval_s: float = 1.0
) -> dict[str, PrometheusServer]:
    """The global plane's Prometheus and org-a's own, scraping the running deployment.

    Raises:
        PrometheusError: either did not start.
    """
    servers: dict[str, PrometheusServer] = {}
    try:
        servers["global"] = start_prometheus(
            "global",
            GLOBAL_CONFIG,
            {
                "echelon-coordinator": metrics_target(deployment, "coordinator"),
                "echelon-audit-log": metrics_target(deployment, "audit-log"),
            },
            work,
            interval_s=interval_s,
        )
        servers["organization"] = start_prometheus(
            "org-a",
            organization_config("org-a"),
            {"echelon-agent": metrics_target(deployment, "org-a")},
            work,
            interval_s=interval_s,
        )
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m echelon_tools.dashboard_shot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--windows", type=int, default=40, help="train this many windows")
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--html", type=Path, help="keep the page here too")
    args = parser.parse_args(list(argv) if argv is not None else None)
    with tempfile.TemporaryDirectory(prefix="echelon-dashboard-") as tmp:
        root = Path(tmp)
        with Deployment(lean_spec(root, adaptive_h=True)) as deployment:
            deployment.start(timeout_s=240)
            servers = start_planes(deployment, root / "prometheus", interval_s=2.0)
            try:
                started = time.time()
                deployment.wait_windows(args.windows, timeout_s=60.0 * args.windows)
                apis = {plane: server.api for plane, server in servers.items()}
                minutes = (time.time() - started) / 60
                page = render(load_queries(), apis, minutes=minutes, title="Echelon (org-a)")
            finally:
                for server in servers.values():
                    server.stop()
        html_path = args.html or root / "dashboard.html"
        html_path.write_text(page)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        screenshot(html_path, args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
