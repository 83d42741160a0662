"""`localsmall serve` under load and at shutdown: 8 concurrent clients x 50 requests
(each completes or gets 429; the server stays up and its memory stays bounded), and
SIGTERM / Ctrl-C ending in-flight requests with an error event."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import TinyModels
from tests.serveprocess import running_server

CLIENTS = 8
REQUESTS = 50
RSS_GROWTH_BOUND = 96 * 1024**2


def _args(tiny: TinyModels, *extra: str) -> list[str]:
    return ["--model", str(tiny.f16), "--no-vision", "--ctx", "4096", "--gpu-layers", "0",
            "--threads", "1", "--no-system", "--temperature", "0", *extra]


@pytest.mark.slow
def test_soak(tiny: TinyModels, tmp_path: Path) -> None:
    with running_server(tmp_path / "home", _args(tiny, "--slots", "4", "--queue", "8")
                        ) as server:
        model = server.model_id()
        outcomes: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        rss: list[int] = []

        def client_loop(k: int) -> None:
            client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0,
                                   timeout=300)
            history: list[Any] = []
            for i in range(REQUESTS):
                # Each client keeps a conversation going (resent in full, as clients do),
                # starting over now and then: slots are reused, extended and evicted.
                if i % 10 == 0:
                    history = []
                history.append({"role": "user", "content": f"client {k} question {i}"})
                try:
                    reply = client.chat.completions.create(model=model, messages=history,
                                                           max_tokens=2)
                    history.append({"role": "assistant",
                                    "content": reply.choices[0].message.content})
                    outcome = "ok" if reply.choices[0].finish_reason else "?"
                except openai.RateLimitError:
                    history.pop()
                    outcome = "429"
                except BaseException as exc:  # anything else fails the test
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    outcomes.append(outcome)
                    if len(outcomes) == CLIENTS * 5:
                        rss.append(server.rss_bytes())  # warmed up: every slot used

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not errors, errors[:3]
        assert len(outcomes) == CLIENTS * REQUESTS
        assert set(outcomes) <= {"ok", "429"} and outcomes.count("ok") >= CLIENTS * 5
        assert httpx2.get(f"{server.root_url}/health").json()["status"] == "ok"
        assert server.rss_bytes() - rss[0] < RSS_GROWTH_BOUND


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_ends_streams_with_an_error(tiny: TinyModels, tmp_path: Path,
                                            sig: int) -> None:
    with running_server(tmp_path / "home", _args(tiny, "--slots", "1")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0,
                               timeout=120)
        stream = client.chat.completions.create(
            model=server.model_id(), messages=[{"role": "user", "content": "Go on."}],
            max_tokens=4000, stream=True, temperature=1.0, seed=7)  # no early EOS
        received = 0
        with pytest.raises(openai.APIError) as error:
            for _chunk in stream:
                received += 1
                if received == 3:
                    server.proc.send_signal(sig)
        assert "shutting down" in str(error.value)
        assert server.stop(sig, timeout=60) == 0
        assert "Traceback" not in server.log()
