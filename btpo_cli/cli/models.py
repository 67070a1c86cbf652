"""``btpo models``: the model alias table, with where each alias comes from and whether it is available offline."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from btpo_cli.console import out
from btpo_cli.models.aliases import ALIASES, SOURCE_TEXT, offline_availability

HELP = "List model aliases, where each comes from and whether it loads offline now (any Hub id or local path works too)."


def models() -> None:
    t = Table(title="model aliases")
    for col in ("alias", "Hub id", "source", "offline now", "family", "note"):
        t.add_column(col)
    for a in ALIASES.values():
        _, how = offline_availability(a.alias)
        t.add_row(*(escape(c) for c in (a.alias, a.hub_id or "-", SOURCE_TEXT[a.source], how, a.family, a.note)))
    out.print(t)
