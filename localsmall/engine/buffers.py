"""The memory llama.cpp actually allocated, read from its own log lines.

llama.cpp reports each buffer it allocates (model weights, KV cache, output, compute,
and mtmd's projector) once, at load time, as "<buffer type> ... buffer size = N MiB".
The engine captures those lines while it loads, so chat, bench and the planner's tests
can compare what was predicted with what llama.cpp really took, per device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 1024 * 1024

_SIZE = r"buffer size =\s+(?P<mib>[\d.]+) MiB"
# kind -> pattern with the buffer type (group "buft", optional) and size in MiB ("mib").
_PATTERNS: dict[str, re.Pattern[str]] = {
    "model": re.compile(r"load_tensors:\s+(?P<buft>\S+) model " + _SIZE),
    "output": re.compile(r"llama_context:\s+(?P<buft>\S+)\s+output " + _SIZE),
    "kv": re.compile(r"llama_kv_cache:\s+(?P<buft>\S+) KV " + _SIZE),
    "compute": re.compile(r"sched_reserve:\s+(?P<buft>\S+) compute " + _SIZE),
    "projector": re.compile(r"load_hparams: model size:\s+(?P<mib>[\d.]+) MiB"),
    "projector_compute": re.compile(r"reserve_compute_meta:\s+(?P<buft>\S+) compute " + _SIZE),
}
BUFFER_KINDS = tuple(_PATTERNS)


@dataclass(frozen=True)
class BufferReport:
    """One buffer llama.cpp allocated: what it holds, its buffer type and its size."""

    kind: str     # model, output, kv, compute, projector, projector_compute
    buffer: str   # llama.cpp's buffer type: CPU, CPU_Mapped, CPU_REPACK, CUDA0, Metal, ...
    size: int     # bytes (llama.cpp prints MiB with two decimals: +-5 KiB)

    @property
    def on_host(self) -> bool:
        """Whether the buffer lives in system RAM (CPU buffers and pinned host buffers)."""
        return self.buffer.upper().startswith("CPU") or self.buffer.endswith("_Host")


def parse_buffer_lines(lines: Iterable[str]) -> tuple[BufferReport, ...]:
    """Every buffer report in llama.cpp/mtmd log lines, in the order they appear."""
    found = []
    for line in lines:
        for kind, pattern in _PATTERNS.items():
            match = pattern.search(line)
            if match:
                groups = match.groupdict()
                found.append(BufferReport(kind, groups.get("buft") or "CPU",
                                          round(float(groups["mib"]) * MIB)))
                break
    return tuple(found)


def total(buffers: Iterable[BufferReport], *, kinds: Iterable[str] | None = None,
          host: bool | None = None) -> int:
    """Bytes in the buffers of the given kinds (all by default), on the host or not."""
    wanted = set(kinds) if kinds is not None else None
    return sum(b.size for b in buffers
               if (wanted is None or b.kind in wanted) and (host is None or b.on_host == host))
