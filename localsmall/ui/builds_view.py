"""The `localsmall list` table."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

from localsmall.models.inventory import StoredBuild
from localsmall.ui.console import muted, out
from localsmall.units import gib


def show_builds(builds: Sequence[StoredBuild]) -> None:
    if not builds:
        muted("No builds downloaded yet; run `localsmall pull` (see `localsmall plan`).")
        return
    table = Table(title="Local builds", title_justify="left")
    for name in ("model", "quant", "size", "verified", "projector", "path"):
        table.add_column(name, justify="right" if name == "size" else "left")
    for b in builds:
        size = (f"{gib(b.size)} of {gib(b.total)}" if b.source == "partial" else gib(b.size))
        verified = "partial download" if b.source == "partial" else b.verified
        table.add_row(escape(b.model_id), escape(b.quant), size, verified,
                      "yes" if b.projector else "no", escape(str(b.path)))
    out().print(table)
