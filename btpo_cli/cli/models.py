"""``btpo models``: the model alias table, with where each alias comes from and whether it is available offline."""

from __future__ import annotations

import typer

from btpo_cli.console import check_format, print_records
from btpo_cli.models.aliases import ALIASES, SOURCE_TEXT, offline_availability

HELP = "List model aliases, where each comes from and whether it loads offline now (any Hub id or local path works too)."

COLUMNS = (("alias", "alias"), ("hub_id", "Hub id"), ("source", "source"), ("offline", "offline now"),
           ("family", "family"), ("note", "note"))
"""JSON keys / TSV header → table headers (docs/cli.md)."""


def models(fmt: str = typer.Option("table", "--format", "-f", help="table | json | tsv.")) -> None:
    check_format(fmt)
    records = []
    for a in ALIASES.values():
        _, how = offline_availability(a.alias)
        records.append({"alias": a.alias, "hub_id": a.hub_id, "source": SOURCE_TEXT[a.source], "offline": how,
                        "family": a.family, "note": a.note})
    print_records(fmt, COLUMNS, records, title="model aliases")
