"""Stage times of a request, for measuring the time to first token
(benchmarks/serve_followup.py). Off unless LOCALSMALL_SERVE_TRACE=1; then each streamed
or collected reply's `timings` carries `trace`: the `time.perf_counter()` moment each
stage ended, in seconds. On Linux that clock is CLOCK_MONOTONIC, shared by every process
of the machine, so a client on the same machine can place the stages on its own clock.
"""

from __future__ import annotations

import os
import time

Stamps = dict[str, float]


def new_trace() -> Stamps | None:
    """A trace for one request when tracing is on, else None."""
    return {} if os.environ.get("LOCALSMALL_SERVE_TRACE") == "1" else None


def mark(trace: Stamps | None, stage: str) -> None:
    """Record the end of `stage` (its first end only)."""
    if trace is not None and stage not in trace:
        trace[stage] = time.perf_counter()
