"""`make demo-docker`'s summary (compose service demo-summary, with no network), run once
every service has stopped: the same `echelon audit verify`, held-out losses, exported
adapter and sample as `make demo`, from the deployment's volumes mounted read-only at
/srv/state/<service> and its configuration at /srv/config. The volumes are copied first
into OUT/state (SQLite opens even a database it only reads with write access to its
directory), so that nothing here can change the deployment's own state."""

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
    containers: each service's data directory is a volume under `state`."""

    def __init__(self, state: Path, config: Path, work: Path) -> None:
        self.spec = SimpleNamespace(root=state)
        self.audit_db = state / "audit-log" / DB_FILE
        self.coordinator_state = state / "coordinator" / "state"
        self._config, self._work = config, work

    def agent_config(self, org: str) -> Path:
        """The agent's file with the data directory it had in its container."""
        tables = load_toml(self._config / f"{org}.toml")
        tables.setdefault("service", {})["data_dir"] = str(self.spec.root / org)
        path = self._work / "config" / f"{org}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(tables))
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="watch.py's output; writable")
    parser.add_argument("--state", type=Path, default=Path("/srv/state"))
    parser.add_argument("--config", type=Path, default=Path("/srv/config"))
    parser.add_argument("--tokens", type=int, required=True, help="tokens the agents trained")
    args = parser.parse_args(argv)
    configure_logging("demo-summary", "warning", json=False)  # the summary, not the steps
    windows = int(json.loads((args.out / "status.json").read_text())["windows"])
    checkpoint = (args.out / "checkpoint.txt").read_text()
    state = args.out / "state"
    if state.exists():
        shutil.rmtree(state)
    shutil.copytree(args.state, state)
    deployment = StoppedDeployment(state, args.config, args.out)
    return demo._finish(
        SimpleNamespace(root=args.out),  # type: ignore[arg-type]
        deployment,  # type: ignore[arg-type]
        windows,
        args.tokens,
        checkpoint,
    )


if __name__ == "__main__":
    sys.exit(main())
