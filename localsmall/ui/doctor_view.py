"""`localsmall doctor`'s report."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from localsmall.plan.doctor import DoctorReport
from localsmall.ui.console import out
from localsmall.units import gib


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  padding=(0, 2))
    table.add_column(style="muted")
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def show_doctor(report: DoctorReport) -> None:
    hw = report.hardware
    gpus = [f"{g.description} ({g.backend}, {gib(g.memory_free)} free of "
            f"{gib(g.memory_total)}{', unified' if g.unified else ''})"
            for g in hw.usable_gpus]
    machine = [
        ("CPU", f"{hw.cpu.model}, {hw.cpu.physical_cores} cores "
                f"({hw.cpu.logical_cores} threads)"),
        ("CPU features", " ".join(hw.cpu.features) or "-"),
        *([("llama.cpp threads", report.threads.reason)] if report.threads else []),
        *([("weight buffers", report.weights)] if report.weights else []),
        ("RAM", f"{gib(hw.ram_available)} available of {gib(hw.ram_total)}"),
        ("GPU offload", "compiled in" if hw.gpu_offload else "not compiled in (CPU-only build)"),
    ]
    machine += [("GPU", g) for g in gpus] or [("GPU", "none usable")]
    machine.append(("RPC (workers)", "available: `localsmall worker` lends devices, --rpc uses "
                    "them" if report.rpc_available else "not compiled in: reinstall with "
                    "`make install` (RPC is on by default)"))
    machine += [("GPU (unusable)", f"{g.name} ({g.vendor})") for g in hw.unusable_gpus]
    if hw.source != "detected":
        machine.append(("described by", hw.source))
    out().print(_table("Machine", machine))
    if report.workers:
        out().print(_table("RPC workers", [
            (f"{d.endpoint} #{d.index}", f"{d.name}: {gib(d.memory_free)} free of "
                                         f"{gib(d.memory_total)}")
            for d in report.workers]))
    out().print(_table("Software", [(k, v) for k, v in report.versions.items()]
                       + [("llama.cpp", report.llama_system_info)]))
    out().print(_table("Files", [
        ("download cache", str(report.cache_dir)),
        ("free disk", gib(report.cache_free)),
        ("localsmall data", str(report.data_dir)),
        ("Hub", report.endpoint + (" (offline: HF_HUB_OFFLINE)" if report.offline else "")),
        ("HF_TOKEN", "set" if report.token_set else "not set"),
    ]))
    for warning in report.warnings:
        out().print(f"[warn]! {escape(warning)}[/]")
