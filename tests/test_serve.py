"""`localsmall serve` end to end: a real server on 127.0.0.1 over the tiny model, driven
by the official openai client (sync and async) and raw HTTP where a client would hide
what is tested."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import TinyModels
from tests.serveprocess import ServerProcess, running_server
from tests.tinymodels import image_bytes

KEY = "test-key-123"
QUEUE = 8
LONG = {"temperature": 1.0, "seed": 7}  # greedy replies of a random model may end early


@pytest.fixture(scope="module")
def server(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("serve")
    args = ["--model", str(tiny.f16), "--mmproj", str(tiny.mmproj), "--ctx", "8192",
            "--gpu-layers", "0", "--threads", "1", "--slots", "3", "--queue", str(QUEUE),
            "--temperature", "0", "--max-body-mb", "2", "--max-image-mb", "1"]
    with running_server(home, args, api_key=KEY) as running:
        yield running


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)


def ask(client: openai.OpenAI, model: str, text: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs)


def data_url(width: int = 112, height: int = 84) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes(width, height)).decode()


def test_models_and_health(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_id()] == ["tiny-F16.gguf"]
    health = httpx2.get(f"{server.root_url}/health").json()  # no key needed
    assert health["status"] == "ready" and health["slots"] == 3


def test_completion_and_stream_agree(server: ServerProcess, client: openai.OpenAI) -> None:
    model = server.model_id()
    reply = ask(client, model, "Name three colours.", max_tokens=6)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens > 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    stream = ask(client, model, "Name three colours.", max_tokens=6, stream=True,
                 stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same reply, streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 6
    # The same prompt again: all of it but the last token comes from the cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_async_client(server: ServerProcess) -> None:
    async def main() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        messages: Any = [{"role": "user", "content": "Count to three."}]
        reply = await client.chat.completions.create(model=server.model_id(),
                                                     messages=messages, max_tokens=5)
        stream = await client.chat.completions.create(model=server.model_id(),
                                                      messages=messages, max_tokens=5,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await client.close()
        return reply.choices[0].message.content or "", text

    full, streamed = asyncio.run(main())
    assert full and full == streamed


def test_image_data_url(server: ServerProcess, client: openai.OpenAI) -> None:
    content: Any = [{"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": data_url()}}]
    with_image = client.chat.completions.create(
        model=server.model_id(), messages=[{"role": "user", "content": content}],
        max_tokens=3)
    without = ask(client, server.model_id(), "What is in this picture?", max_tokens=3)
    # 112x84 is 4x3 merged patches: 12 image tokens, 2 [IMG_BREAK]s, [IMG_END].
    assert with_image.usage.prompt_tokens - without.usage.prompt_tokens == 4 * 3 + 2 + 1


def test_image_from_http_url(server: ServerProcess, client: openai.OpenAI) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = image_bytes(112, 84)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        def send(url: str) -> Any:
            content: Any = [{"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "Describe it."}]
            return client.chat.completions.create(
                model=server.model_id(), messages=[{"role": "user", "content": content}],
                max_tokens=2)

        assert send(f"{base}/cat.png").usage.prompt_tokens > 15
        with pytest.raises(openai.BadRequestError) as missing:
            send(f"{base}/missing.png")
        assert "404" in str(missing.value) and missing.value.param == \
            "messages[0].content[0].image_url"
    finally:
        httpd.shutdown()


def test_conversation_resent_in_full_is_cached(server: ServerProcess,
                                               client: openai.OpenAI) -> None:
    model = server.model_id()
    messages: list[Any] = [{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": "Tell me about tulips."}]
    previous = None
    for turn in range(3):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        cached = reply.usage.prompt_tokens_details.cached_tokens
        if previous is not None:
            # Everything the last turn read and generated is still in the cache (the
            # last generated token was never fed back).
            assert cached >= previous.usage.prompt_tokens + previous.usage.completion_tokens - 1
            assert reply.usage.prompt_tokens - cached < 20  # only the new message is read
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"And question {turn + 2}?"}]
        previous = reply


def test_stop_sequence(server: ServerProcess, client: openai.OpenAI) -> None:
    model = server.model_id()
    full = ask(client, model, "Write a sentence.", max_tokens=12).choices[0].message.content
    assert full and len(full) > 6
    stop = full[3:6]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        reply = ask(client, model, "Write a sentence.", max_tokens=12, stop=[stop],
                    stream=stream)
        if stream:
            chunks = [c for c in reply if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 2}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]},
     "messages[0].content[1].image_url"),
])
def test_bad_requests(server: ServerProcess, client: openai.OpenAI, kwargs: dict[str, Any],
                      param: str) -> None:
    request: dict[str, Any] = {"model": server.model_id(),
                               "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**request)
    assert error.value.status_code == 400 and error.value.param == param
    assert error.value.type == "invalid_request_error"


def test_unknown_model_and_auth(server: ServerProcess) -> None:
    good = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as unknown:
        ask(good, "gpt-4o", "hi")
    assert unknown.value.code == "model_not_found"
    for key in ("wrong-key-123", KEY + "x", ""):
        bad = openai.OpenAI(base_url=server.base_url, api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    no_header = httpx2.post(f"{server.base_url}/chat/completions", json={})
    assert no_header.status_code == 401 and no_header.json()["error"]["code"] == \
        "invalid_api_key"


def test_raw_http_errors(server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.base_url}/chat/completions"
    big = {"model": server.model_id(), "messages": [{"role": "user", "content": "x" * 3_000_000}]}
    too_large = httpx2.post(url, json=big, headers=headers, timeout=60)
    assert too_large.status_code == 413 and too_large.json()["error"]["message"]
    broken = httpx2.post(url, content=b"{not json", headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["type"] == \
        "invalid_request_error"
    nowhere = httpx2.get(f"{server.base_url}/nothing", headers=headers)
    assert nowhere.status_code == 404 and "error" in nowhere.json()
    # CORS is off without --cors: no Access-Control headers for a foreign page.
    page = httpx2.get(f"{server.base_url}/models", headers={**headers, "Origin": "http://evil"})
    assert "access-control-allow-origin" not in page.headers
    assert httpx2.get(f"{server.root_url}/health").json()["status"] == "ready"  # still up


def _short_id(chunk_line: bytes) -> str:
    match = re.search(rb'"id": "chatcmpl-([0-9a-f]{8})', chunk_line)
    assert match
    return match.group(1).decode()


def test_disconnect_stops_generation(server: ServerProcess) -> None:
    body = {"model": server.model_id(), "stream": True, "max_tokens": 4000,
            **LONG,
            "messages": [{"role": "user", "content": "Write a long story."}]}
    received = 0
    with httpx2.stream("POST", f"{server.base_url}/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as response:
        lines = response.iter_lines()
        short = ""
        for line in lines:
            if line.startswith("data: {"):
                short = short or _short_id(line.encode())
                received += 1
                if received == 4:
                    break
    # The connection is closed: the generation stops at its next token.
    deadline = time.monotonic() + 120
    pattern = re.compile(rf"{short} cancelled after (\d+) tokens")
    while not (match := pattern.search(server.log())):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert int(match.group(1)) < 4000
    assert httpx2.get(f"{server.root_url}/health").json()["waiting"] == 0


def test_queue_full_answers_429(server: ServerProcess, client: openai.OpenAI) -> None:
    model = server.model_id()
    long_body = {"model": model, "stream": True, "max_tokens": 4000,
            **LONG,
                 "messages": [{"role": "user", "content": "Keep talking."}]}
    results: list[Any] = []

    def short_request() -> None:
        try:
            results.append(ask(client, model, "hi", max_tokens=1))
        except openai.RateLimitError as exc:
            results.append(exc)

    with httpx2.stream("POST", f"{server.base_url}/chat/completions", json=long_body,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as response:
        lines = response.iter_lines()  # kept: closing it would close the connection
        next(line for line in lines if '"content": "' in line
             and '"content": ""' not in line)  # the long reply holds the decoder now
        threads = [threading.Thread(target=short_request) for _ in range(QUEUE + 2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while sum(isinstance(r, openai.RateLimitError) for r in results) < 2:
            assert time.monotonic() < deadline, (results, server.log())
            time.sleep(0.05)
    for t in threads:
        t.join(120)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(limited) == 2 and len(results) == QUEUE + 2
    assert all(r.response.headers["retry-after"].isdigit() for r in limited)
    assert all(r.choices[0].finish_reason == "length" for r in results if r not in limited)
