"""Terminal output of ``dsq calib list``."""

from __future__ import annotations

import json


def print_sets(rows: list[dict], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    from ..render import make_console

    table = Table(title="dsq calibration sets (--calib NAME, or a .txt/.jsonl file)")
    for col in ("name", "kind", "size", "docs", "licence", "source / description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            escape(r["name"]), escape(r["kind"]), f"{r['bytes'] / 1024:.1f} KB", str(r["documents"]),
            escape(r["licence"]), f"{escape(r['description'])}\n[dim]{escape(r['source'])}[/dim]",
        )
    make_console().print(table)
