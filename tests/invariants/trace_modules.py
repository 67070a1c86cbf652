"""Run one ``btpo`` command in this interpreter and write the project modules it imported, in import order.

    python -m tests.invariants.trace_modules OUT.json train --method btpo ...

Used by ``tests/invariants/test_architecture.py`` to check docs/architecture.md's "top to bottom" tables
against what the commands really import. Writes ``{"startup": [...], "command": [...]}``: the modules
``import btpo_cli.cli`` loads (every command has them), then those the command imports once it runs, each in
``sys.modules`` order (the order imports began); ``btpo_cli`` and ``data_builders`` only.
"""

from __future__ import annotations

import atexit
import json
import sys


def project_modules() -> list[str]:
    return [m for m in sys.modules if m.split(".")[0] in ("btpo_cli", "data_builders")]


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    sys.argv = ["btpo", *args]
    from btpo_cli.cli import main as btpo  # the start-up: the CLI, its subcommands and registries

    startup = project_modules()

    def dump() -> None:
        with open(out, "w") as f:
            json.dump({"startup": startup, "command": [m for m in project_modules() if m not in startup]}, f)

    atexit.register(dump)
    btpo()


if __name__ == "__main__":
    main()
