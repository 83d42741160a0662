"""`localsmall doctor`: what this machine offers and where localsmall keeps its files."""

from __future__ import annotations

from typing import Annotated

import typer

from localsmall.commands.options import JsonOpt, rpc_endpoints


def doctor(
    rpc: Annotated[list[str] | None, typer.Option(
        "--rpc", help="Also list the devices of these RPC workers (HOST:PORT, "
        "comma-separated or repeated), with their memory.", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the devices, memory, CPU features, versions and download cache."""
    from localsmall.plan.doctor import diagnose

    report = diagnose(rpc=rpc_endpoints(rpc))
    if as_json:
        from localsmall.ui.console import print_json

        print_json(report.to_json())
        return
    from localsmall.ui.doctor_view import show_doctor

    show_doctor(report)
