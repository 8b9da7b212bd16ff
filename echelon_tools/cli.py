"""The `echelon` command: `demo`, `export`, `audit`, `replay`, `contest`, `wan-check`."""

from __future__ import annotations

import sys

USAGE = """usage: echelon COMMAND [ARGS]

commands:
  demo     run the multi-site demo on this machine (make demo)
  export   write a global adapter version as a peft adapter directory
  audit    verify or show an audit log (echelon audit verify --help)
  replay   rebuild global versions from stored aggregates and check them against the log
  contest  the budget-matched strategy contest in the simulator (echelon contest --help)
  wan-check  the services under WAN delay against the simulator's prediction
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from echelon_tools.demo import main as run
    elif command == "export":
        from echelon_tools.export import main as run
    elif command == "contest":
        from echelon_tools.contest import main as run
    elif command == "wan-check":
        from echelon_tools.wancheck import main as run
    elif command == "replay":
        from services.global_coordinator.replay import main as run
    elif command == "audit":
        from echelon_tools.audit import main as run
    else:
        print(f"echelon: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
