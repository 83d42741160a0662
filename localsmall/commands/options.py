"""Option types shared by several commands, declared once."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from localsmall.engine.types import KV_TYPES
from localsmall.errors import UsageError
from localsmall.runtime.options import RunOptions, SamplingOptions, SessionOptions

ModelArg = Annotated[str | None, typer.Argument(
    metavar="[MODEL[:QUANT]]", help="Catalog model (default mistral-small-3.2), optionally "
    "with a quant, e.g. mistral-small-3.2:Q5_K_M.", show_default=False)]
ModelPathOpt = Annotated[Path | None, typer.Option(
    "--model", "-m", help="Run this GGUF file instead of a catalog build.",
    rich_help_panel="Model")]
MmprojOpt = Annotated[Path | None, typer.Option(
    "--mmproj", help="Vision projector GGUF to use with --model.", rich_help_panel="Model")]
QuantOpt = Annotated[str | None, typer.Option(
    "--quant", "-q", help="Quant to run (e.g. Q4_K_M).", rich_help_panel="Model")]
NoVisionOpt = Annotated[bool, typer.Option(
    "--no-vision", help="Do not load the vision projector.", rich_help_panel="Model")]
CtxOpt = Annotated[int | None, typer.Option(
    "--ctx", "-c", help="Context length in tokens (default: the model's default, 32768).",
    rich_help_panel="Engine")]
GpuLayersOpt = Annotated[int | None, typer.Option(
    "--gpu-layers", "-ngl", help="Layers to offload to the GPU (-1: all).",
    rich_help_panel="Engine")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", "-t", help="CPU threads (default: physical cores).", rich_help_panel="Engine")]
KvTypeOpt = Annotated[str, typer.Option(
    "--kv-type", help=f"KV cache type: {', '.join(KV_TYPES)}.", rich_help_panel="Engine")]
FlashAttnOpt = Annotated[bool | None, typer.Option(
    "--flash-attn/--no-flash-attn", help="Force flash attention on or off (default: auto).",
    rich_help_panel="Engine", show_default=False)]
BatchOpt = Annotated[int, typer.Option(
    "--batch", help="Prompt tokens evaluated per llama.cpp call.", rich_help_panel="Engine")]
ImageTokensOpt = Annotated[int | None, typer.Option(
    "--image-tokens", help="Scale each image to at most N tokens (fewer: a faster turn, "
    "fewer details). Default: full resolution, or on a CPU-only plan a size that keeps an "
    "image turn near 20 s.", rich_help_panel="Engine", show_default=False)]
RpcOpt = Annotated[list[str] | None, typer.Option(
    "--rpc", help="RPC workers (`localsmall worker` on other machines) that take part of the "
    "model: HOST:PORT, comma-separated or repeated.", rich_help_panel="Engine",
    show_default=False)]
MinSpeedOpt = Annotated[float | None, typer.Option(
    "--min-speed", help="Generate at least this many tokens/s with the context full: the "
    "best quality that reaches it, trading context or quant (speeds from a calibration of "
    "this machine).", rich_help_panel="Engine", show_default=False)]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show llama.cpp's own logs.", rich_help_panel="Engine")]
TemperatureOpt = Annotated[float | None, typer.Option(
    "--temperature", "--temp", help="Sampling temperature (default 0.15, as Mistral "
    "recommends; 0 = greedy).", rich_help_panel="Sampling")]
TopPOpt = Annotated[float | None, typer.Option(
    "--top-p", help="Nucleus sampling threshold.", rich_help_panel="Sampling")]
TopKOpt = Annotated[int | None, typer.Option(
    "--top-k", help="Keep only the K most likely tokens (0 = off).", rich_help_panel="Sampling")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", help="Random seed, for reproducible sampling.", rich_help_panel="Sampling")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    "--max-tokens", "-n", help="Stop a reply after this many tokens.",
    rich_help_panel="Sampling")]
SystemOpt = Annotated[str | None, typer.Option(
    "--system", help="System prompt (default: Mistral's, with today's date).",
    rich_help_panel="Sampling")]
NoSystemOpt = Annotated[bool, typer.Option(
    "--no-system", help="Send no system prompt.", rich_help_panel="Sampling")]


def check_kv_type(kv_type: str) -> None:
    """--kv-type names a KV cache type llama.cpp has."""
    if kv_type not in KV_TYPES:
        raise UsageError(f"--kv-type must be one of {', '.join(KV_TYPES)}")


JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the result as JSON (for scripts).")]
YesOpt = Annotated[bool, typer.Option(
    "--yes", "-y", help="Download what is missing without asking (for scripts).")]


@dataclass(frozen=True)
class RunFlags:
    """The flags `chat` and `run` share (see `with_run_flags`), as typed values."""

    model_path: Path | None
    mmproj: Path | None
    quant: str | None
    no_vision: bool
    ctx: int | None
    gpu_layers: int | None
    threads: int | None
    kv_type: str
    flash_attn: bool | None
    batch: int
    image_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    max_tokens: int | None
    system: str | None
    no_system: bool
    rpc: list[str] | None
    verbose: bool
    yes: bool
    min_speed: float | None = None

    def run_options(self, model: str | None, *, vision: bool = True) -> RunOptions:
        """RunOptions for MODEL[:QUANT] (`vision=False` also leaves the projector out),
        with the checks that need no model."""
        check_kv_type(self.kv_type)
        return RunOptions(ref=model, quant=self.quant, model_path=self.model_path,
                          mmproj_path=self.mmproj, vision=vision and not self.no_vision,
                          n_ctx=self.ctx, n_gpu_layers=self.gpu_layers,
                          n_threads=self.threads, kv_type=self.kv_type,
                          flash_attn=self.flash_attn, n_batch=self.batch, verbose=self.verbose,
                          rpc=rpc_endpoints(self.rpc),
                          min_speed=check_min_speed(self.min_speed))

    def session_options(self) -> SessionOptions:
        """Sampling overrides and the system prompt."""
        sampling = SamplingOptions(temperature=self.temperature, top_p=self.top_p,
                                   top_k=self.top_k, seed=self.seed, max_tokens=self.max_tokens)
        return SessionOptions(sampling=sampling, system=self.system, no_system=self.no_system,
                              image_tokens=check_image_tokens(self.image_tokens))


# The shared flags in the order `--help` lists them, with their defaults.
_RUN_FLAGS: tuple[tuple[str, Any, Any], ...] = (
    ("model_path", ModelPathOpt, None), ("mmproj", MmprojOpt, None), ("quant", QuantOpt, None),
    ("no_vision", NoVisionOpt, False), ("ctx", CtxOpt, None),
    ("gpu_layers", GpuLayersOpt, None), ("threads", ThreadsOpt, None),
    ("kv_type", KvTypeOpt, "f16"), ("flash_attn", FlashAttnOpt, None),
    ("batch", BatchOpt, 512), ("image_tokens", ImageTokensOpt, None),
    ("temperature", TemperatureOpt, None), ("top_p", TopPOpt, None),
    ("top_k", TopKOpt, None), ("seed", SeedOpt, None), ("max_tokens", MaxTokensOpt, None),
    ("system", SystemOpt, None), ("no_system", NoSystemOpt, False), ("rpc", RpcOpt, None),
    ("verbose", VerboseOpt, False), ("yes", YesOpt, False), ("min_speed", MinSpeedOpt, None),
)


def check_min_speed(value: float | None) -> float | None:
    """--min-speed is a positive number of tokens per second."""
    if value is not None and not value > 0:
        raise UsageError("--min-speed must be a positive number of tokens/s, e.g. --min-speed 5")
    return value


def check_image_tokens(value: int | None) -> int | None:
    """--image-tokens, checked before anything is loaded."""
    from localsmall.images import MIN_IMAGE_BUDGET

    if value is not None and value < MIN_IMAGE_BUDGET:
        raise UsageError(f"--image-tokens must be at least {MIN_IMAGE_BUDGET}")
    return value


def with_run_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the flags chat and run share: Typer sees them after the command's
    own parameters; the command receives them as one `RunFlags` named `flags`."""
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items()
           if name != "flags"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                default=default) for name, kind, default in _RUN_FLAGS]

    def wrapper(**kwargs: Any) -> None:
        flags = RunFlags(**{name: kwargs.pop(name) for name, _, _ in _RUN_FLAGS})
        command(**kwargs, flags=flags)

    for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(wrapper, attribute, getattr(command, attribute))
    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in own] + shared)
    return wrapper


def rpc_endpoints(values: list[str] | None) -> tuple[str, ...]:
    """Worker endpoints from --rpc values (none: an empty tuple)."""
    from localsmall.engine.rpc import parse_endpoints

    return parse_endpoints(values) if values else ()
