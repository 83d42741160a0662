"""How many threads llama.cpp gets by default, and why (shown by `localsmall doctor`).

One thread per physical core available to this process, for generation and for prompt
reading alike. SMT siblings share a core's execution units and its path to memory, so
a second thread on a core adds nothing to a matrix product and only makes llama.cpp's
threads wait for each other at every step. Generation reads every weight once per token
and is bound by memory bandwidth, which a few cores already saturate; prompt reading is
bound by arithmetic and uses every core. llama.cpp's threads meet at a barrier after
each operation, spinning while they wait: a thread whose core is taken by another
program stalls all of them. Measured on a 2-core machine shared with other work
(benchmarks/threads.py, load average 6 to 8): one thread read prompts 2.6 times and
generated 8 times faster than two. The default does not follow the load of the moment
(it changes while a model runs); `doctor` warns when the cores are busy now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ThreadChoice:
    """The default thread counts and the facts they come from."""

    generation: int        # llama.cpp's n_threads
    prompt: int            # n_threads_batch
    physical_cores: int    # available to this process
    logical_cpus: int      # available to this process
    reason: str            # one line: what was chosen and why
    load_average: float | None = None  # 1-minute load average now (None: unknown)
    advice: str = ""       # one line when the cores are busy now, else ""

    def to_json(self) -> dict[str, object]:
        return {"generation": self.generation, "prompt": self.prompt,
                "physical_cores": self.physical_cores, "logical_cpus": self.logical_cpus,
                "reason": self.reason, "load_average": self.load_average,
                "advice": self.advice}


def choose_threads(*, physical_cores: int, logical_cpus: int,
                   load_average: float | None = None) -> ThreadChoice:
    """The default for a machine with these cores available (and this load now)."""
    cores = max(1, min(physical_cores, logical_cpus) if physical_cores else logical_cpus)
    logical = max(1, logical_cpus)
    if logical > cores:
        why = (f"one per physical core ({logical} logical CPUs: SMT siblings share a "
               f"core and add nothing to llama.cpp's matrix products)")
    else:
        why = "one per core"
    reason = (f"{cores} thread{'s' if cores != 1 else ''} for generation and prompt "
              f"reading: {why}; generation is memory-bound and prompt reading "
              f"compute-bound, both use every core")
    advice = ""
    if load_average is not None and cores > 1:
        busy = load_average - 0.5  # a little background work leaves the cores usable
        if busy >= 1:
            fewer = max(1, cores - int(busy + 0.5))
            if fewer < cores:
                advice = (f"the load average is {load_average:.1f} on {cores} cores: other "
                          f"programs keep cores busy, and llama.cpp's threads then wait for "
                          f"each other; --threads {fewer} may be much faster until they "
                          f"finish (benchmarks/threads.py measures it)")
    return ThreadChoice(generation=cores, prompt=cores, physical_cores=cores,
                        logical_cpus=logical, reason=reason, load_average=load_average,
                        advice=advice)


def available_cpus() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def physical_cores(available: int) -> int:
    """Physical cores among the `available` logical CPUs (Linux: /proc/cpuinfo's core
    ids; elsewhere every logical CPU counts as a core)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return available
    cores = {line.split(":")[1].strip() for line in text.splitlines()
             if line.startswith("core id")}
    siblings = available // max(len(cores), 1)
    if cores and siblings >= 2:
        return max(1, available // siblings)
    return max(1, available)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def detect_threads(*, with_load: bool = False) -> ThreadChoice:
    """The default on this machine (with the load now when `with_load`)."""
    available = available_cpus()
    return choose_threads(physical_cores=physical_cores(available), logical_cpus=available,
                          load_average=load_average() if with_load else None)
