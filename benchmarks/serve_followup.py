"""`localsmall serve` against llama-cpp-python's own server (`llama_cpp.server`, same GGUF
and projector) on the 370M-parameter model: a 6-turn conversation with an image in turn 1,
resent in full each turn as OpenAI clients do. Per turn: time to first token over HTTP
(streaming) on both servers, and for localsmall the time its engine spent evaluating the
turn's own new tokens (the `timings` it returns). Then generation speed of the server
against `localsmall run` on the same prompt.

Targets: from turn 2 on, localsmall's time to first token within 10% of its new tokens'
evaluation, and at least 5x faster than llama_cpp.server by turn 6; tokens/s within 3% of
`localsmall run`.

    .venv/bin/python benchmarks/serve_followup.py [--threads 2] [--localsmall-only] [--rounds 3]
        [--speed-rounds 5]

The time to first token is given from the call (the client encoding its JSON included)
and from the first byte sent. localsmall runs with LOCALSMALL_SERVE_TRACE=1, so each turn
also shows where the time went: the client's and the server's stages on one clock
(perf_counter is CLOCK_MONOTONIC on Linux), each as milliseconds after the previous one.

llama_cpp.server needs its extras: pip install fastapi sse-starlette starlette-context
pydantic-settings. On a CPU with AMX, its quantized weights are kept out of the AMX
buffer, as localsmall's engine does (benchmarks/placement.py decides): llama.cpp crashes
there on batched decode.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
from PIL import Image
from synthetic import ROOT, medium_model

from tests.serveprocess import free_port

TURNS = ("What is in this picture?", "Which colour dominates?", "And in the corners?",
         "Is there any text in it?", "Describe the top half.", "Summarise in one line.")
REPLY_TOKENS = 24
SPEED_TOKENS = 128
SYSTEM = "You describe images."


def _picture() -> str:
    pixels = np.random.default_rng(0).integers(0, 255, (336, 448, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _llama_cpp_server_child(argv: list[str]) -> None:
    """Run llama_cpp.server with the weight placement localsmall uses (benchmarks/
    placement.py): on an AMX CPU, quantized weights stay out of the AMX buffer."""
    sys.argv = ["llama_cpp.server", *argv]
    import llama_cpp.llama_cpp as low
    from placement import reference_placement

    if not reference_placement().repack:
        default = low.llama_model_default_params

        def params() -> Any:
            p = default()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = params  # type: ignore[assignment]
    from llama_cpp.server.__main__ import main

    main()


@contextlib.contextmanager
def _process(cmd: list[str], health: str, log: Path, **env_extra: str) -> Iterator[None]:
    env = dict(os.environ, **{"PYTHONPATH": str(ROOT), **env_extra})
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[2]} exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(health, timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{cmd[2]} did not start")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


_CLIENTS: dict[str, httpx2.Client] = {}


def _client(base: str) -> httpx2.Client:
    """One client (and its kept-alive connection) per server, as OpenAI clients keep
    theirs: a new client per request would add its own setup to every first token."""
    if base not in _CLIENTS:
        _CLIENTS[base] = httpx2.Client(timeout=600)
    return _CLIENTS[base]


def _turn(base: str, model: str, messages: list[Any], max_tokens: int, **extra: Any
          ) -> tuple[float, str, dict[str, Any]]:
    """Stream one reply: (seconds to the first token, the reply, localsmall's timings).
    The timings get the client's own stage moments (`client`, perf_counter seconds)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, **extra}
    client = _client(base)
    stamps: dict[str, float] = {}

    def on_trace(event: str, info: Any) -> None:
        stamps.setdefault(event.split(".", 1)[1], time.perf_counter())

    start = time.perf_counter()
    stamps["start"] = start
    first, text, timings = 0.0, [], {}
    with client.stream("POST", f"{base}/chat/completions", json=body,
                       extensions={"trace": on_trace}) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            timings = data.get("timings") or timings
            for choice in data.get("choices") or ():
                piece = choice["delta"].get("content")
                if piece and not first:
                    first = time.perf_counter() - start
                    stamps["first_content"] = start + first
                text.append(piece or "")
    if timings:
        timings["client"] = stamps
    return first, "".join(text), timings


CLIENT_STAGES = {"send_request_headers.started": "client_sending",
                 "send_request_body.complete": "client_sent",
                 "receive_response_headers.complete": "client_got_headers"}


def _stages(timings: dict[str, Any]) -> str:
    """Where the time to first token went (LOCALSMALL_SERVE_TRACE=1): each stage's
    milliseconds after the previous one, client and server on one clock."""
    client, server = timings.get("client") or {}, timings.get("trace") or {}
    if not server:
        return ""
    moments = [(CLIENT_STAGES.get(name, name), client[name])
               for name in ("start", *CLIENT_STAGES) if name in client]
    moments += sorted(server.items(), key=lambda item: item[1])
    if "slot" in server:  # the engine's own evaluation inside generate
        moments.append(("evaluated", server["slot"] + timings["prompt_ms"] / 1000))
    moments.append(("client_first_content", client["first_content"]))
    moments.sort(key=lambda item: item[1])
    out, last = [], moments[0][1]
    for name, moment in moments[1:]:
        out.append(f"{name} {(moment - last) * 1000:+.2f}")
        last = moment
    return "    stages (ms after the previous): " + ", ".join(out)


def _conversation(servers: dict[str, tuple[str, str]], system: str = SYSTEM
                  ) -> dict[str, list[float]]:
    """One 6-turn conversation; returns localsmall's TTFT/evaluation ratios of turns 2-6,
    timed from the call and from the first byte sent."""
    picture = _picture()
    history: dict[str, list[Any]] = {name: [{"role": "system", "content": system}]
                                     for name in servers}
    ttft: dict[str, list[float]] = {name: [] for name in servers}
    ratios: dict[str, list[float]] = {}  # localsmall's, timed from the call / the wire
    for number, question in enumerate(TURNS, 1):
        content: Any = question if number > 1 else [
            {"type": "image_url", "image_url": {"url": picture}},
            {"type": "text", "text": question}]
        line, stages = [f"turn {number}:"], ""
        for name, (base, model) in servers.items():
            history[name].append({"role": "user", "content": content})
            seconds, text, timings = _turn(base, model, history[name], REPLY_TOKENS)
            history[name].append({"role": "assistant", "content": text})
            ttft[name].append(seconds)
            line.append(f"{name} {seconds * 1000:.0f} ms")
            own = timings.get("prompt_ms", 0) / 1000
            if own:
                client = timings["client"]
                wire = client["first_content"] - client["send_request_headers.started"]
                ratios.setdefault("call", []).append(seconds / own)
                ratios.setdefault("wire", []).append(wire / own)
                line.append(f"(new {timings['prompt_n']} of "
                            f"{timings['prompt_n'] + timings['cache_n']} positions, "
                            f"their evaluation {own * 1000:.1f} ms, engine's first token "
                            f"{timings['first_token_ms']:.0f} ms -> ratio "
                            f"{seconds / own:.2f}; from the first byte sent "
                            f"{wire * 1000:.1f} ms -> {wire / own:.2f})")
            stages = stages or _stages(timings)
        if len(servers) == 2:
            a, b = ttft.values()
            line.append(f"-> localsmall x{b[-1] / a[-1]:.1f} faster")
        print(" ".join(line), flush=True)
        if stages:
            print(stages, flush=True)
    for kind, values in ratios.items():
        follow = values[1:]
        print(f"ratio TTFT/evaluation, turns 2-{len(values)}, timed from "
              f"{'the call' if kind == 'call' else 'the first byte sent'}: "
              + " ".join(f"{v:.2f}" for v in follow)
              + f" (median {_median(follow):.2f})", flush=True)
    return {kind: values[1:] for kind, values in ratios.items()}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _speed(base: str, model: str, gguf: Path, threads: int, rounds: int) -> None:
    """Generation speed of the server against `localsmall run` on the same prompt,
    alternated `rounds` times (one 128-token sample of either varies by a few percent
    on a busy 2-core machine): the ratio of the medians."""
    prompt = "Tell me a long story about a lighthouse keeper."
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    served, ran = [], []
    for _ in range(rounds):
        _, _, timings = _turn(base, model, messages, SPEED_TOKENS, temperature=1.0, seed=7)
        served.append(timings["predicted_per_second"])
        run = subprocess.run(
            [sys.executable, "-m", "localsmall", "run", "--model", str(gguf), "--json",
             "--threads", str(threads), "--max-tokens", str(SPEED_TOKENS), "--temperature",
             "1", "--seed", "7", "--system", SYSTEM, "--ctx", "8192", "--gpu-layers", "0",
             prompt],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=ROOT, check=True)
        ran.append(json.loads(run.stdout)["stats"]["generation_tps"])
    print(f"generation, {SPEED_TOKENS} tokens x {rounds}: serve "
          + " ".join(f"{v:.1f}" for v in served) + " tok/s, run "
          + " ".join(f"{v:.1f}" for v in ran) + f" tok/s -> ratio of the medians "
          f"{_median(served) / _median(ran):.3f} (load {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--localsmall-only", action="store_true",
                        help="time localsmall's turns only (no llama_cpp.server, no speed)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="conversations to time (each with its own system prompt, so "
                        "none finds another in the cache); the summary pools their turns")
    parser.add_argument("--speed-rounds", type=int, default=5,
                        help="serve/run generation samples, alternated")
    parser.add_argument("--llama-cpp-server-child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.llama_cpp_server_child is not None:
        _llama_cpp_server_child(args.llama_cpp_server_child)
        return
    gguf, mmproj = medium_model("Q4_K_M")
    logs = Path(__file__).resolve().parent / ".cache"
    ours, theirs = free_port(), free_port()
    ours_cmd = [sys.executable, "-m", "localsmall", "serve", "--model", str(gguf), "--mmproj",
                str(mmproj), "--ctx", "8192", "--threads", str(args.threads), "--slots", "2",
                "--gpu-layers", "0", "--port", str(ours)]
    theirs_cmd = [sys.executable, str(Path(__file__).resolve()), "--llama-cpp-server-child",
                  "--model", str(gguf), "--clip_model_path", str(mmproj), "--chat_format",
                  "mtmd", "--n_ctx", "8192", "--n_threads", str(args.threads),
                  "--n_threads_batch", str(args.threads), "--host", "127.0.0.1", "--port",
                  str(theirs)]
    from placement import reference_placement

    print(f"model {gguf.name} + {mmproj.name}, {args.threads} threads; "
          f"{reference_placement().note}", flush=True)
    with contextlib.ExitStack() as running:
        running.enter_context(_process(ours_cmd, f"http://127.0.0.1:{ours}/health",
                                       logs / "serve.log", LOCALSMALL_SERVE_TRACE="1"))
        base = f"http://127.0.0.1:{ours}/v1"
        servers = {"localsmall": (base, httpx2.get(f"{base}/models").json()["data"][0]["id"])}
        if not args.localsmall_only:
            running.enter_context(_process(theirs_cmd, f"http://127.0.0.1:{theirs}/v1/models",
                                           logs / "llama.log"))
            their_base = f"http://127.0.0.1:{theirs}/v1"
            servers["llama_cpp.server"] = (
                their_base, httpx2.get(f"{their_base}/models").json()["data"][0]["id"])
        pooled: dict[str, list[float]] = {}
        for number in range(args.rounds):
            system = SYSTEM if number == 0 else f"{SYSTEM} (Conversation {number + 1}.)"
            for kind, values in _conversation(servers, system).items():
                pooled.setdefault(kind, []).extend(values)
        if args.rounds > 1:
            for kind, values in pooled.items():
                print(f"all {args.rounds} conversations, turns 2-6, timed from "
                      f"{'the call' if kind == 'call' else 'the first byte sent'}: median "
                      f"{_median(values):.3f}, {len(values)} turns, load "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
        if not args.localsmall_only:
            _speed(base, servers["localsmall"][1], gguf, args.threads, args.speed_rounds)


if __name__ == "__main__":
    main()
