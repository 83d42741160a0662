"""The first request after `localsmall serve` starts: how long until its first token.

Requests without a system message get the model's default system prompt (~430
positions). Without a warm-up the first such request reads it; with it (server.warmup)
the server restores the state saved by an earlier start, or reads it in the background
right after loading. Three cases on the 370M-parameter model, alternated round by round
(one case per fresh server and LOCALSMALL_HOME):

  neither   the tree given by --baseline (a checkout without the warm-up)
  read      this tree, nothing saved yet: the request, sent as soon as /health says ok,
            waits for the background read
  restored  this tree again on the home `read` left behind: the saved state is loaded
  later     this tree, nothing saved, the request sent once /health says the read ended
            (a client that comes a little after the start)

For each: the load (process start to /health 200) and the time to the first token of a
one-token, non-streaming request sent right then (client side), and their sum.

    python benchmarks/serve_system.py --baseline /work/main --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
from synthetic import ROOT, medium_model

from tests.serveprocess import free_port

TREE = ROOT
MESSAGE = [{"role": "user", "content": "Hello! What can you do for me today?"}]


def _run(tree: Path, home: Path, threads: int, *, later: bool = False) -> dict[str, Any]:
    """One server start and its first request (`later`: once the read ended)."""
    gguf, mmproj = medium_model("Q4_K_M")
    port = free_port()
    env = dict(os.environ, LOCALSMALL_HOME=str(home), PYTHONPATH=str(tree),
               LOCALSMALL_CALIBRATE="0", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "localsmall", "serve", "--model", str(gguf), "--mmproj",
           str(mmproj), "--ctx", "8192", "--threads", str(threads), "--slots", "2",
           "--gpu-layers", "0", "--port", str(port)]
    root = f"http://127.0.0.1:{port}"
    log = home / "serve.log"
    start = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=str(tree), env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{log.read_text()}")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{root}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.01)
        load_s = time.perf_counter() - start
        state = httpx2.get(f"{root}/health").json().get("system_prompt", "-")
        while later and httpx2.get(f"{root}/health").json().get("system_prompt") == "reading":
            time.sleep(0.01)
        model = httpx2.get(f"{root}/v1/models").json()["data"][0]["id"]
        sent = time.perf_counter()
        reply = httpx2.post(f"{root}/v1/chat/completions", timeout=600, json={
            "model": model, "messages": MESSAGE, "max_tokens": 1, "temperature": 0})
        first_s = time.perf_counter() - sent
        reply.raise_for_status()
        cached = reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        # The server's own figure for restoring or reading the system prompt.
        found = re.search(r"(?:restored from cache \(|system prompt read in )([\d.]+) s",
                          " ".join(log.read_text().split()))
        return {"load_s": load_s, "first_token_s": first_s, "total_s": load_s + first_s,
                "state_at_ready": state, "cached": cached,
                "warm_s": float(found.group(1)) if found else 0.0}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True,
                        help="a checkout of localsmall without the warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"neither": [], "read": [], "restored": [],
                                                 "later": []}
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
                tempfile.TemporaryDirectory() as c:
            results["neither"].append(_run(args.baseline, Path(a), args.threads))
            results["read"].append(_run(TREE, Path(b), args.threads))
            results["restored"].append(_run(TREE, Path(b), args.threads))
            results["later"].append(_run(TREE, Path(c), args.threads, later=True))
        print(f"round {i + 1}: " + " | ".join(
            f"{name} load {r[-1]['load_s']:.2f} s first token {r[-1]['first_token_s']:.2f} s"
            f" ({r[-1]['state_at_ready']} {r[-1]['warm_s']:.2f} s, {r[-1]['cached']} cached)"
            for name, r in results.items()), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    base = statistics.median(r["first_token_s"] for r in results["neither"])
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("load_s", "first_token_s", "total_s")}
        print(f"{name:9s} median: load {med['load_s']:.2f} s, first token "
              f"{med['first_token_s']:.3f} s ({med['first_token_s'] / base:.2f}x neither), "
              f"start to first token {med['total_s']:.2f} s")


if __name__ == "__main__":
    main()
