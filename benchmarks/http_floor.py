"""The HTTP floor under `localsmall serve`'s time to first token: a trivial ASGI app on the
same stack (uvicorn + httptools, its own process) that reads a follow-up's body (the
6-turn conversation of serve_followup.py with its 600 KB image resent), parses it with
orjson and streams one SSE event back, driven by the same client code (httpx2, json=,
streaming). Nothing of localsmall runs in it: no template, no tokenizer, no engine.

Prints the medians from the client's call and from the first byte sent, to set beside
serve_followup.py's time to first token and its 10% target.

    .venv/bin/python benchmarks/http_floor.py [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from synthetic import ROOT

WARM_UP = 20  # requests left out of the medians (connection set-up, first allocations)


def _serve(port: int) -> None:
    import orjson
    import uvicorn

    from localsmall.server.runner import bind

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] == "POST":  # (the start-up probe is a GET)
            orjson.loads(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"x": 1}\n\n',
                    "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    config = uvicorn.Config(app, http="httptools", log_level="error", lifespan="off")
    uvicorn.Server(config).run(sockets=[bind("127.0.0.1", port)])


def _body() -> dict[str, Any]:
    from serve_followup import REPLY_TOKENS, SYSTEM, TURNS, _picture

    messages: list[Any] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _picture()}},
        {"type": "text", "text": TURNS[0]}]}]
    for question in TURNS[1:]:
        messages += [{"role": "assistant", "content": "A reply of about twenty-four tokens, "
                      "as the benchmark's replies are, with words and more words."},
                     {"role": "user", "content": question}]
    return {"model": "m", "messages": messages, "max_tokens": REPLY_TOKENS, "stream": True,
            "temperature": 0}


def _time(url: str, body: dict[str, Any], requests: int) -> tuple[list[float], list[float]]:
    import httpx2

    client = httpx2.Client(timeout=60)
    calls, wires = [], []
    for _ in range(requests):
        stamps: dict[str, float] = {}

        def on_trace(event: str, info: Any, stamps: dict[str, float] = stamps) -> None:
            stamps.setdefault(event, time.perf_counter())

        start = time.perf_counter()
        first = 0.0
        with client.stream("POST", url, json=body, extensions={"trace": on_trace}) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {") and not first:
                    json.loads(line[6:])
                    first = time.perf_counter()
        calls.append(first - start)
        wires.append(first - stamps["http11.send_request_headers.started"])
    return calls[WARM_UP:], wires[WARM_UP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve)
        return
    import httpx2

    from tests.serveprocess import free_port

    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)],
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx2.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx2.HTTPError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise SystemExit("the trivial server did not start") from None
                time.sleep(0.1)
        calls, wires = _time(f"http://127.0.0.1:{port}/v1/chat/completions", _body(),
                             args.requests)
    finally:
        child.terminate()
        child.wait(30)
    call_ms = statistics.median(calls) * 1000
    print(f"HTTP floor, {len(calls)} requests: first event {call_ms:.2f} ms from the call,"
          f" {statistics.median(wires) * 1000:.2f} ms from the first byte sent "
          f"(median; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
