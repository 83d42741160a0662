"""Peak memory of a benchmark run: the process's resident set high-water mark, and
the accelerator memory a loaded model takes.

On Linux the high-water mark can be reset (`/proc/self/clear_refs`), so each sweep
combination gets its own peak; elsewhere the peak is the process's since it started.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS; False where not supported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (since the last reset, on Linux)."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def device_free_bytes() -> dict[int, int]:
    """Free memory of each GPU device ggml sees (empty on a CPU-only build)."""
    from localsmall.bench.system import GPU_KINDS
    from localsmall.engine.devices import list_devices

    return {d.index: d.memory_free for d in list_devices() if d.kind in GPU_KINDS}


def device_used_bytes(before: dict[int, int], after: dict[int, int]) -> int | None:
    """GPU memory taken between two `device_free_bytes()` readings; None without GPUs."""
    if not before:
        return None
    return sum(max(before[i] - after.get(i, before[i]), 0) for i in before)
