"""`localsmall list`: the builds on this machine."""

from __future__ import annotations

from localsmall.commands.options import JsonOpt


def list_builds(as_json: JsonOpt = False) -> None:
    """Show local builds: quant, size, whether verified, whether the projector is there."""
    from localsmall.models.catalog import load_catalog
    from localsmall.models.inventory import list_builds as find_builds

    builds = find_builds(load_catalog())
    if as_json:
        from localsmall.ui.console import print_json

        print_json([b.to_json() for b in builds])
        return
    from localsmall.ui.builds_view import show_builds

    show_builds(builds)
