"""`localsmall rm`: delete a build."""

from __future__ import annotations

from typing import Annotated

import typer


def rm(ref: Annotated[str, typer.Argument(
        metavar="MODEL:QUANT", help="The build to delete, e.g. mistral-small-3.2:Q4_K_M "
        "(MODEL:projector deletes the vision projector).", show_default=False)]) -> None:
    """Delete a downloaded (or registered) build and any unfinished download of it."""
    from localsmall.models.catalog import load_catalog
    from localsmall.models.inventory import remove_build
    from localsmall.ui.console import notice, warn
    from localsmall.units import gib

    removed = remove_build(load_catalog(), ref)
    notice(f"removed {removed.label} ({gib(removed.freed)} freed)")
    for path in removed.kept:
        warn(f"{path} was not made by localsmall and is kept; delete it yourself if you want")
