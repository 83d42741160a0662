"""`localsmall plan --rpc`: every quant split over this machine and the workers, and the
chosen one device by device."""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from localsmall.plan.rpc import RpcOption, RpcPlan
from localsmall.ui.console import out
from localsmall.units import GIB, quality_label


def _gb(n: int) -> str:
    return f"{n / GIB:.1f}" if n else "-"


def _layers(option: RpcOption) -> str:
    return " / ".join(str(s.n_layers) for s in option.split.shares)


def show_rpc_plan(plan: RpcPlan, local: set[str]) -> None:
    """The quants table, the chosen split and the network's cost (stdout)."""
    table = Table(title=f"{escape(plan.model_id)} over this machine and "
                        f"{len(plan.workers)} remote device(s) (sizes in GiB)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("", "left"), ("quant", "left"), ("size", "right"),
                          ("context", "right"), ("layers here / remote", "left"),
                          ("quality", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    choice = plan.choice.quant if plan.choice else None
    for o in plan.options:
        name = escape(o.quant) + (" [ok]✓[/]" if o.quant.lower() in local else "")
        table.add_row("[ok]➜[/]" if o.quant == choice else "", name, _gb(o.size),
                      f"{o.split.n_ctx:,}" if o.split.fits else "no fit",
                      _layers(o), quality_label(o.kld),
                      style=None if o.split.fits else "muted")
    out().print(table)
    if plan.choice is not None:
        show_split(plan.choice)
    out().print(escape(plan.reason))


def show_split(option: RpcOption) -> None:
    """One row per device: its layers, memory and budget; then the network's cost."""
    split = option.split
    table = Table(title=f"{escape(option.quant)} split, {split.n_ctx:,}-token context",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("device", "left"), ("layers", "left"), ("weights", "right"),
                          ("KV", "right"), ("other", "right"), ("total", "right"),
                          ("free", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for s in split.shares:
        where = "this machine (CPU)" if s.endpoint is None else f"{s.device} {s.endpoint}"
        layers = (f"{s.first_layer}-{s.first_layer + s.n_layers - 1}" if s.n_layers else "-")
        extras = [x for x in ("output head" if s.output else "",
                              "projector" if s.memory.projector else "") if x]
        if extras:
            layers += " + " + ", ".join(extras)
        m = s.memory
        table.add_row(escape(where), layers, _gb(m.weights), _gb(m.kv),
                      _gb(m.compute + m.projector + m.tables), _gb(m.total), _gb(s.budget),
                      style=None if s.fits else "error")
    out().print(table)
    kib = split.bytes_per_token / 1024
    out().print(f"Network: about {kib:,.0f} KiB and {split.round_trips_per_token} round trips "
                f"per generated token: ~{split.network_seconds_per_token() * 1000:.1f} ms "
                "per token on a 1 Gbit/s LAN.")
