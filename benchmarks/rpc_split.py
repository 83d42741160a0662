"""Splitting a model over two RPC workers on this machine (loopback) vs running it locally:
prompt processing and generation tokens/s, their ratios, and the bytes that cross the
network per prompt token and per generated token (TCP's counters for the workers'
connections, read with `ss`).

    python benchmarks/rpc_split.py [--quant Q4_K_M] [--prompt 256] [--gen 64] [--tiny]
                                   [--model FILE.gguf ...]

The default model is the ~370M-parameter synthetic one (8 layers, 1024 wide, the real
131072-token vocabulary); --tiny adds the test suite's model (2 layers, 256 wide) so the
traffic can be split into what grows with the width and what does not. All layers go
to the workers (half each, the output head on the second); this machine keeps the input
embeddings, as llama.cpp does. Loopback has no bandwidth limit worth the name: the
ratios show the protocol's own cost; the README turns the bytes into a 1 Gbit/s figure.
Everything runs pinned to one CPU (--cpu) and local and split turns alternate: on a shared
machine three processes would otherwise get three shares of the CPU against one.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from synthetic import ROOT, medium_model, tiny_model

from localsmall.engine import rpc
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings, TokenRun


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(threads: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "localsmall", "worker", "--port", str(port),
                             "--threads", str(threads), "--no-cache"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    for _ in range(600):
        try:
            rpc.handshake(address, timeout=2)
            return address, proc
        except rpc.WorkerError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("a worker did not start")


def io_bytes(ports: list[int]) -> int:
    """Bytes the workers' open connections have sent and received so far (TCP's own
    counters, from `ss`: the socket calls do not show in /proc/PID/io)."""
    total = 0
    for port in ports:
        text = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                              capture_output=True, text=True, check=True).stdout
        total += sum(int(n) for n in re.findall(r"bytes_(?:sent|received):(\d+)", text))
    return total


def turn(engine: Engine, prompt: list[int], n_gen: int) -> tuple[float, float, int]:
    """(prompt tokens/s, generation tokens/s, tokens generated) from an empty cache."""
    engine.reset()
    result = engine.generate([TokenRun(tuple(prompt))],
                             SamplingSettings(temperature=0, max_tokens=n_gen)).run()
    return result.stats.prompt_tps, result.stats.generation_tps, len(result.token_ids)


def settings_for(model: Path, threads: int, endpoints: tuple[str, ...] = ()) -> EngineSettings:
    return EngineSettings(model_path=model, n_ctx=2048, n_threads=threads, rpc_servers=endpoints,
                          n_gpu_layers=999 if endpoints else 0,
                          tensor_split=(1.0, 1.0) if endpoints else ())


def measure(model: Path, *, n_prompt: int, n_gen: int, threads: int, reps: int,
            endpoints: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Local and split turns taken in turn (the machine's load then weighs on both)."""
    with Engine(settings_for(model, threads)) as local, \
            Engine(settings_for(model, threads, endpoints)) as split:
        text = "The quick brown fox jumps over the lazy dog. " * 200
        prompt = local.tokenize(text, special=False)[:n_prompt]
        runs: dict[str, dict[str, list[float]]] = {"local": {"pp": [], "tg": []},
                                                   "split": {"pp": [], "tg": []}}
        for engine in (local, split):
            turn(engine, prompt[:16], 4)  # warm-up
        for _ in range(reps):
            for name, engine in (("local", local), ("split", split)):
                pp, tg, _ = turn(engine, prompt, n_gen)
                runs[name]["pp"].append(pp)
                runs[name]["tg"].append(tg)
        result = {name: {k: max(v) for k, v in r.items()} for name, r in runs.items()}
        ports = [int(e.rsplit(":", 1)[1]) for e in endpoints]
        before = io_bytes(ports)
        turn(split, prompt, 1)
        one = io_bytes(ports) - before
        before = io_bytes(ports)
        _, _, made = turn(split, prompt, n_gen)
        many = io_bytes(ports) - before
        result["split"]["bytes_per_prompt_token"] = one / len(prompt)
        result["split"]["bytes_per_gen_token"] = (many - one) / max(made - 1, 1)
        result["split"]["remote_weight_mib"] = sum(
            b.size for b in split.buffers if b.kind == "model" and not b.on_host) / 2**20
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="per process (1: a shared machine's cores are not oversubscribed)")
    parser.add_argument("--tiny", action="store_true", help="also the test suite's model")
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="also this GGUF (e.g. one written by make_fullshape.py --layers 8: "
                        "the real width, so the real traffic per token)")
    parser.add_argument("--cpu", type=int, default=0,
                        help="pin everything to this CPU (-1: no pinning), so that local and "
                        "split runs get the same CPU time on a shared machine")
    args = parser.parse_args()
    args.cpu = None if args.cpu < 0 else args.cpu
    models = [("370M " + args.quant, medium_model(args.quant)[0])]
    if args.tiny:
        models.append(("tiny F16", tiny_model()[0]))
    models += [(path.stem, path) for path in args.model]
    if args.cpu is not None:  # this process and the workers (inherited) share one core
        os.sched_setaffinity(0, {args.cpu})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        endpoints: tuple[str, ...] = ()
        for _ in range(2):
            address, proc = start_worker(args.threads)
            procs.append(proc)
            endpoints += (address,)
        for label, path in models:
            result = measure(path, n_prompt=args.prompt, n_gen=args.gen, threads=args.threads,
                             reps=args.reps, endpoints=endpoints)
            local, split = result["local"], result["split"]
            print(f"== {label} ({path.name}), {args.prompt}-token prompt, {args.gen} "
                  f"generated, {args.threads} thread(s) per process, best of {args.reps}"
                  + (f", all on CPU {args.cpu}" if args.cpu is not None else ""))
            print(f"  weights on the workers: {split['remote_weight_mib']:.0f} MiB")
            for key, name in (("pp", "prompt"), ("tg", "generation")):
                print(f"  {name:10} local {local[key]:8.1f} tok/s   split {split[key]:8.1f} "
                      f"tok/s   split/local {split[key] / local[key]:.2f}")
            print(f"  network: {split['bytes_per_prompt_token'] / 1024:.1f} KiB per prompt "
                  f"token, {split['bytes_per_gen_token'] / 1024:.1f} KiB per generated token")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


if __name__ == "__main__":
    main()
