"""`localsmall doctor`: what this machine offers and where localsmall keeps its files."""

from __future__ import annotations

from localsmall.commands.options import JsonOpt


def doctor(as_json: JsonOpt = False) -> None:
    """Show the devices, memory, CPU features, versions and download cache."""
    from localsmall.plan.doctor import diagnose

    report = diagnose()
    if as_json:
        from localsmall.ui.console import print_json

        print_json(report.to_json())
        return
    from localsmall.ui.doctor_view import show_doctor

    show_doctor(report)
