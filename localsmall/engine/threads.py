"""How many threads llama.cpp gets by default, and why (shown by `localsmall doctor`).

One thread per physical core available to this process, for generation and for prompt
reading alike. SMT siblings share a core's execution units and its path to memory, so
a second thread on a core adds nothing to a matrix product. Generation reads every
weight once per token and is bound by memory bandwidth; prompt reading is bound by
arithmetic; both gained from every core here.

llama.cpp's threads meet at an OpenMP barrier after each operation. By default OpenMP
spins there, so a thread whose core another program holds stalls the others: on this
project's 2-core machine, shared with other work (load average 5 to 8), two spinning
threads read prompts 2.6 times and generated 8 times slower than one thread (synthetic
medium model, benchmarks/threads.py). With OMP_WAIT_POLICY=PASSIVE waiting threads
sleep, and two threads were faster than one under the same kind of load: medium model
2.0x at prompts and 1.6x at generation, full-size Q4_K_M model 3.2x and 2.5x (wall
clock; the CPU time per token stayed that of one thread). So the engine sets
OMP_WAIT_POLICY=PASSIVE unless the user set it (before llama.cpp loads; `localsmall
worker` did so already) and keeps one thread per core. A sleeping thread costs a wake-up
(microseconds) at each of the few hundred barriers of a token: well under 1% of a token
of the full-size model. `doctor` warns when the cores are busy and OMP_WAIT_POLICY makes
the threads spin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WAIT_POLICY = "PASSIVE"  # OpenMP threads sleep while they wait (see above)


def apply_wait_policy() -> None:
    """Make OpenMP's threads sleep while they wait, unless OMP_WAIT_POLICY is set.
    Must run before llama.cpp's libraries load (OpenMP reads it then)."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def wait_policy() -> str:
    """The OMP_WAIT_POLICY llama.cpp runs with in this process."""
    return os.environ.get("OMP_WAIT_POLICY", WAIT_POLICY).upper()


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
    wait_policy: str = WAIT_POLICY  # OMP_WAIT_POLICY: PASSIVE (threads sleep) or ACTIVE

    def to_json(self) -> dict[str, object]:
        return {"generation": self.generation, "prompt": self.prompt,
                "physical_cores": self.physical_cores, "logical_cpus": self.logical_cpus,
                "reason": self.reason, "load_average": self.load_average,
                "advice": self.advice, "wait_policy": self.wait_policy}


def choose_threads(*, physical_cores: int, logical_cpus: int,
                   load_average: float | None = None,
                   policy: str = WAIT_POLICY) -> ThreadChoice:
    """The default for a machine with these cores available (and this load now, and
    this OMP_WAIT_POLICY)."""
    cores = max(1, min(physical_cores, logical_cpus) if physical_cores else logical_cpus)
    logical = max(1, logical_cpus)
    if logical > cores:
        why = (f"one per physical core ({logical} logical CPUs: SMT siblings share a "
               f"core and add nothing to llama.cpp's matrix products)")
    else:
        why = "one per core"
    sleeping = policy.upper() == "PASSIVE"
    reason = (f"{cores} thread{'s' if cores != 1 else ''} for generation and prompt "
              f"reading: {why}; generation is memory-bound and prompt reading "
              f"compute-bound, both use every core; waiting threads "
              + ("sleep (OMP_WAIT_POLICY=PASSIVE), so a core other programs use costs "
                 "only its share" if sleeping else
                 f"spin (OMP_WAIT_POLICY={policy.upper()})"))
    advice = ""
    if load_average is not None and cores > 1 and not sleeping:
        busy = load_average - 0.5  # a little background work leaves the cores usable
        if busy >= 1:
            fewer = max(1, cores - int(busy + 0.5))
            if fewer < cores:
                advice = (f"the load average is {load_average:.1f} on {cores} cores and "
                          f"OMP_WAIT_POLICY={policy.upper()} makes llama.cpp's threads spin "
                          f"while they wait: unset it (localsmall then uses PASSIVE) or use "
                          f"--threads {fewer}; either may be many times faster")
    return ThreadChoice(generation=cores, prompt=cores, physical_cores=cores,
                        logical_cpus=logical, reason=reason, load_average=load_average,
                        advice=advice, wait_policy=policy.upper())


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
                          load_average=load_average() if with_load else None,
                          policy=wait_policy())
