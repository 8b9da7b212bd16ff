"""`make demo-docker`'s summary (compose service demo-summary, with no network), run once
every service has stopped: the same `echelon audit verify`, held-out losses, exported
adapter and sample as `make demo`, from the deployment's volumes mounted read-only at
/srv/state/<service> and its configuration at /srv/config. The volumes are copied first
into OUT/<service>, where `make demo` keeps each service's data directory (SQLite opens
even a database it only reads with write access to its directory), so that nothing here
can change the deployment's own state."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from echelon.tomlconfig import dumps, load_toml
from echelon_tools import demo
from services.audit_log.server import DB_FILE
from services.common.obs import configure_logging


class StoppedDeployment:
    """What `echelon_tools.demo` reads of a deployment, for one whose services ran in
    containers: each service's data directory is a copy of its volume under `root`."""

    def __init__(self, root: Path, config: Path, manifest: Path) -> None:
        self.spec = SimpleNamespace(root=root)
        # The signed manifest the deployment ran under: verify takes every key from it.
        self.manifest = manifest
        self.audit_db = root / "audit-log" / DB_FILE
        self.coordinator_state = root / "coordinator" / "state"
        self._config = config

    def agent_config(self, org: str) -> Path:
        """The agent's file with the data directory it had in its container."""
        tables = load_toml(self._config / f"{org}.toml")
        tables.setdefault("service", {})["data_dir"] = str(self.spec.root / org)
        path = self.spec.root / "config" / f"{org}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(tables))
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="watch.py's output; writable")
    parser.add_argument("--state", type=Path, default=Path("/srv/state"))
    parser.add_argument("--config", type=Path, default=Path("/srv/config"))
    parser.add_argument(
        "--manifest",
        type=Path,
        default=Path("/srv/manifest/manifest.json"),
        help="the signed manifest, with the root.pub it verifies against beside it",
    )
    parser.add_argument("--tokens", type=int, required=True, help="tokens the agents trained")
    args = parser.parse_args(argv)
    configure_logging("demo-summary", "warning", json=False)  # the summary, not the steps
    windows = int(json.loads((args.out / "status.json").read_text())["windows"])
    checkpoint = (args.out / "checkpoint.txt").read_text()
    for volume in sorted(args.state.iterdir()):
        copy = args.out / volume.name
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(volume, copy)
    deployment = StoppedDeployment(args.out, args.config, args.manifest)
    return demo._finish(
        SimpleNamespace(root=args.out),  # type: ignore[arg-type]
        deployment,  # type: ignore[arg-type]
        windows,
        args.tokens,
        checkpoint,
    )


if __name__ == "__main__":
    sys.exit(main())
