"""Which thread count reads prompts and generates fastest on this machine.

localsmall's default is one thread per physical core (localsmall.engine.devices.
default_threads; `localsmall doctor` says what it chose). This measures generation and
prompt reading with each `--threads-list` count (default: 1, 2 and the default), each
in a fresh process, alternating counts round by round so a change in the machine's load
hits them alike: medians, the same-round ratios to the default, load averages. Speeds
per CPU second are reported too. `--wait-policies PASSIVE,ACTIVE` also compares how
llama.cpp's OpenMP threads wait for each other (the engine's default is PASSIVE: they
sleep; ACTIVE: they spin, which is what costs so much when other programs keep the cores
busy).

    .venv/bin/python benchmarks/threads.py [--quant Q4_K_M] [--runs 3]
    .venv/bin/python benchmarks/threads.py --model big.gguf --wrap "flock LOCK timeout 600"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import medium_model
from weight_repack import child, report

from localsmall.engine.devices import default_threads
from localsmall.engine.threads import wait_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="Q4_K_M", help="of the synthetic medium model")
    parser.add_argument("--model", type=Path, help="measure this GGUF instead")
    parser.add_argument("--threads-list", default="")
    parser.add_argument("--runs", type=int, default=3, help="loads per thread count")
    parser.add_argument("--per-load", type=int, default=2, help="measurements per load")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--placement", default=os.environ.get("LOCALSMALL_WEIGHT_REPACK",
                                                              "auto"))
    parser.add_argument("--wait-policies", default="",
                        help="OMP_WAIT_POLICY values to compare (default: the engine's)")
    parser.add_argument("--wrap", default="", help="command prefix for each measurement")
    args = parser.parse_args()
    args.threads = default_threads()
    path = args.model or medium_model(args.quant)[0]
    counts = sorted({int(n) for n in args.threads_list.split(",") if n}
                    or {1, 2, args.threads})
    print(f"model {path.name}; default {args.threads} threads; {os.cpu_count()} CPUs; "
          f"prompt {args.prompt}, generation {args.gen} tokens; placement {args.placement}")
    policies = [p.upper() for p in args.wait_policies.split(",") if p] or [wait_policy()]
    names = {(n, p): f"{n}t {p.lower()}" for n in counts for p in policies}
    results: dict[str, list[dict]] = {name: [] for name in names.values()}
    for _ in range(args.runs):
        for (n, policy), name in names.items():
            os.environ["OMP_WAIT_POLICY"] = policy  # the child's OpenMP reads it
            results[name].append(child(args, path, args.placement, n))
            print(f"  {name}: {results[name][-1]['runs']}"[:200], file=sys.stderr, flush=True)
    report(results, base_name=names[(args.threads, policies[0])])


if __name__ == "__main__":
    main()
