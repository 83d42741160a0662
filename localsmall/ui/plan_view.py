"""The `localsmall plan` table: every quant, where it would run, and the choice."""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from localsmall.plan.rules import Plan, QuantOption
from localsmall.ui.console import out
from localsmall.units import GIB, quality_label

WHERE_SHORT = {"gpu": "GPU", "split": "GPU+CPU", "cpu": "CPU", "none": "no fit"}


def _gb(n: int) -> str:
    return f"{n / GIB:.1f}" if n else "-"


def _row(option: QuantOption, chosen: bool, local: set[str], gpus: bool) -> list[str]:
    name = f"[bold]{escape(option.quant)}[/]" if chosen else escape(option.quant)
    if option.quant.lower() in local:
        name += " [ok]✓[/]"
    cells = ["[ok]➜[/]" if chosen else "", name, _gb(option.size), WHERE_SHORT[option.where]]
    if gpus:
        cells += [f"{option.gpu_layers}/{option.n_layers}" if option.fits else "-",
                  _gb(option.gpu_bytes)]
    cells += [_gb(option.ram_bytes),
              _pair(option.tokens_per_s, option.tokens_per_s_deep) if option.fits else "-",
              _pair(option.prompt_tps, option.prompt_tps_deep) if option.fits else "-",
              quality_label(option.kld)]
    return cells


def _tps(value: float | None) -> str:
    if value is None or value <= 0:
        return "?"
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _pair(empty: float | None, deep: float | None) -> str:
    """Speed at an empty context -> at the planned depth."""
    return f"{_tps(empty)}→{_tps(deep)}"


SOURCE_WORDS = {
    "measured": "measured by `localsmall bench` on this machine",
    "calibrated": "from a calibration of this machine's llama.cpp kernels",
    "estimated": "estimated from assumed memory bandwidth and FLOP/s (not measured)",
}


def speed_sources(plan: Plan) -> str:
    """Where the table's speeds come from, by quant when they differ."""
    by_source: dict[str, list[str]] = {}
    for option in plan.options:
        if option.fits:
            by_source.setdefault(option.speed_source, []).append(option.quant)
    if len(by_source) <= 1:
        source = next(iter(by_source), "estimated")
        return f"[muted]Speeds: {SOURCE_WORDS[source]}.[/]"
    parts = [f"{', '.join(escape(q) for q in quants)} {SOURCE_WORDS[source]}"
             for source, quants in by_source.items()]
    return f"[muted]Speeds: {'; '.join(parts)}.[/]"


def plan_table(plan: Plan, local: set[str], *, gpus: bool) -> Table:
    """One row per quant; the recommendation is marked (➜), downloaded builds ticked."""
    choice = plan.choice.quant if plan.choice else None
    n_ctx = plan.choice.n_ctx if plan.choice else plan.requested_ctx
    depth = plan.choice.speed_depth if plan.choice else n_ctx
    table = Table(title=f"{escape(plan.model_id)}: {n_ctx:,}-token context, {plan.kv_type} "
                        f"KV cache (sizes in GiB; tokens/s with an empty context → with "
                        f"{depth:,} tokens in it)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    columns = [("", "left"), ("quant", "left"), ("size", "right"), ("runs on", "left")]
    if gpus:
        columns += [("layers", "right"), ("GPU", "right")]
    columns += [("RAM", "right"), ("gen\ntok/s", "right"), ("prompt\ntok/s", "right"),
                ("quality", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for option in plan.options:
        table.add_row(*_row(option, option.quant == choice, local, gpus),
                      style=None if option.fits else "muted")
    return table


def show_plan(plan: Plan, local: set[str], *, gpus: bool) -> None:
    """The table, then the one sentence why (on stdout: it is the command's result)."""
    out().print(plan_table(plan, local, gpus=gpus))
    out().print(speed_sources(plan))
    out().print(escape(plan.reason))
    if plan.choice is not None and plan.choice.quant.lower() not in local:
        out().print(f"[muted]Download it with: localsmall pull {escape(plan.model_id)}:"
                    f"{escape(plan.choice.quant)}[/]")
