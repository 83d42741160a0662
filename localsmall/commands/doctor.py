"""`localsmall doctor`: what this machine offers and where localsmall keeps its files."""

from __future__ import annotations

from localsmall.commands.options import JsonOpt


def doctor(as_json: JsonOpt = False) -> None:
    """Show the devices, memory, CPU features, versions and download cache."""
    from localsmall.doctor import diagnose

    report = diagnose()
    if as_json:
        import json

        from localsmall.plan.hardware import to_json
        from localsmall.ui.console import stdout_write

        data = {"hardware": to_json(report.hardware), "versions": report.versions,
                "llama_system_info": report.llama_system_info,
                "cache_dir": str(report.cache_dir), "cache_free": report.cache_free,
                "data_dir": str(report.data_dir), "endpoint": report.endpoint,
                "offline": report.offline, "token_set": report.token_set,
                "warnings": list(report.warnings)}
        stdout_write(json.dumps(data, indent=2) + "\n")
        return
    from localsmall.ui.doctor_view import show_doctor

    show_doctor(report)
