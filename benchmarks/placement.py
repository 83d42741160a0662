"""Where a benchmark's reference puts quantized weights on this CPU: the one decision every
benchmark asks, so references stay like for like with localsmall and never crash.

llama.cpp may copy quantized weights into CPU-specific "extra buffer types" (CPU_REPACK;
AMX on Intel Sapphire Rapids and later). The AMX one crashes on batched decodes
(llama.cpp #20824), so localsmall's Engine loads with `use_extra_bufts=False` on such a
CPU (LOCALSMALL_WEIGHT_REPACK=auto|on|off). A reference built with llama.cpp's defaults
(llama-cpp-python's `Llama`, `llama-bench`) would crash there, and elsewhere would differ
from localsmall if the placement were not the same; `reference_placement()` says which
placement localsmall uses, and each benchmark builds its reference with it.

Pass `devices` (a simulated CPU description) to ask about another CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localsmall.engine.devices import BackendDevice, list_devices

AMX_CRASH = "llama.cpp's AMX weight buffer crashes on batched decodes (llama.cpp #20824)"


@dataclass(frozen=True)
class Placement:
    """The weight placement a reference uses."""

    repack: bool  # whether llama.cpp may put weights in its extra (repacked) buffer types
    amx: bool     # whether this CPU offers the AMX buffer type (where repacking crashes)
    note: str     # one line for the benchmark's output

    def skip_repacking(self) -> str:
        """Why a measurement that forces repacking on must be skipped here ("" when it
        can run)."""
        return f"skipped on this AMX CPU: {AMX_CRASH}" if self.amx else ""


def has_amx(devices: Sequence[BackendDevice]) -> bool:
    """Whether a CPU device offers llama.cpp's AMX buffer type (as the engine's
    `cpu_has_amx_repack` asks of the real devices)."""
    return any("AMX" in buft.upper()
               for dev in devices if dev.kind == "cpu"
               for buft in dev.extra_buffer_types)


def reference_placement(*, devices: Sequence[BackendDevice] | None = None,
                        environ: Mapping[str, str] | None = None) -> Placement:
    """The placement localsmall's Engine picks on this CPU (or on `devices`), honouring
    LOCALSMALL_WEIGHT_REPACK exactly as the Engine does."""
    amx = has_amx(list_devices() if devices is None else devices)
    mode = (os.environ if environ is None else environ).get(
        "LOCALSMALL_WEIGHT_REPACK", "auto").lower()
    if mode == "off":
        return Placement(repack=False, amx=amx,
                         note="weight repacking off (LOCALSMALL_WEIGHT_REPACK=off)")
    if mode == "auto" and amx:
        return Placement(repack=False, amx=amx,
                         note=f"weight repacking off for localsmall and its reference: {AMX_CRASH}")
    return Placement(repack=True, amx=amx, note="weight repacking as llama.cpp defaults")
