"""The `echelon` command: `demo`, `export`, `audit`, `replay`, `contest`, `wan-check`,
`provision`, `keygen`, `manifest`, `kit`."""

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
  provision  write a development federation: root, CA, one kit per party, signed manifest
  keygen   generate a party's keys locally; write only the public enrolment to send
  manifest   show, verify or rotate a signed federation manifest (echelon manifest --help)
  kit      install a delivered kit into a private directory (echelon kit install SRC DST)
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
    elif command == "provision":
        from echelon_tools.provision import main_provision as run
    elif command == "keygen":
        from echelon_tools.provision import main_keygen as run
    elif command == "manifest":
        from echelon_tools.provision import main_manifest as run
    elif command == "kit":
        from echelon_tools.provision import main_kit as run
    else:
        print(f"echelon: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
