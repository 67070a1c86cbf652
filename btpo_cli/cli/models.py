"""``btpo models``: the model alias table."""

from __future__ import annotations

from rich.table import Table

from btpo_cli.console import out

HELP = "List model aliases (any Hub id or local path works too)."


def models() -> None:
    from btpo_cli.models import ALIASES

    t = Table(title="model aliases")
    for col in ("alias", "resolves to", "family", "note"):
        t.add_column(col)
    for a in ALIASES.values():
        t.add_row(a.alias, a.hub_id, a.family, a.note)
    out.print(t)
