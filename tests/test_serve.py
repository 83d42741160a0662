"""`localsmall serve` end to end: a real server on 127.0.0.1 over the tiny model, driven
by the official openai client (sync and async) and raw HTTP where a client would hide
what is tested."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
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
IMAGE_TIMEOUT_S = 2
LONG = {"temperature": 1.0, "seed": 7}  # greedy replies of a random model may end early


@pytest.fixture(scope="module")
def server(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("serve")
    args = ["--model", str(tiny.f16), "--mmproj", str(tiny.mmproj), "--ctx", "8192",
            "--gpu-layers", "0", "--threads", "1", "--slots", "3", "--queue", str(QUEUE),
            "--temperature", "0", "--max-body-mb", "2", "--max-image-mb", "1",
            "--image-timeout", str(IMAGE_TIMEOUT_S)]
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
    assert health["status"] == "ok" and health["slots"] == 3


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


@contextlib.contextmanager
def image_server() -> Iterator[str]:
    """A local web server for image_url tests: an image, redirects, a web page, bytes
    that are no image, images over the 1 MiB limit (announced or not) and two that stall
    (before the headers, mid-body) until the test ends."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = image_bytes(112, 84)
    big = b"\x89PNG" + b"\0" * (3 * 2**20 // 2)
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def reply(self, body: bytes, content_type: str = "image/png", *,
                  length: bool = True) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path
            if path in ("/redirect", "/loop"):
                self.send_response(302)
                self.send_header("Location", "/cat.png" if path == "/redirect" else "/loop")
                self.end_headers()
            elif path == "/cat.png":
                self.reply(png)
            elif path == "/page.html":
                self.reply(b"<html>not an image</html>", "text/html; charset=utf-8")
            elif path == "/noise.png":
                self.reply(b"definitely not a PNG" * 10)
            elif path == "/big.png":
                self.reply(big)
            elif path == "/big-unannounced.png":  # no Content-Length: the body ends at close
                self.reply(big, length=False)
            elif path == "/stall-headers.png":
                release.wait(60)
            elif path == "/stall-body.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png[:100])
                self.wfile.flush()
                release.wait(60)
            else:
                self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


def send_image_url(server: ServerProcess, client: openai.OpenAI, url: str) -> Any:
    content: Any = [{"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe it."}]
    return client.chat.completions.create(
        model=server.model_id(), messages=[{"role": "user", "content": content}],
        max_tokens=2)


IMAGE_PARAM = "messages[0].content[0].image_url"


def test_image_from_http_url(server: ServerProcess, client: openai.OpenAI) -> None:
    with image_server() as base:
        assert send_image_url(server, client, f"{base}/cat.png").usage.prompt_tokens > 15
        # A redirect is followed to the image: the same prompt.
        assert send_image_url(server, client, f"{base}/redirect").usage.prompt_tokens == \
            send_image_url(server, client, f"{base}/cat.png").usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as missing:
            send_image_url(server, client, f"{base}/missing.png")
        assert "404" in str(missing.value) and missing.value.param == IMAGE_PARAM


@pytest.mark.parametrize(("path", "code", "words"), [
    ("/big.png", "image_too_large", "larger than the 1 MiB limit"),
    ("/big-unannounced.png", "image_too_large", "larger than the 1 MiB limit"),
    ("/loop", None, "more than 3 redirects"),
    ("/page.html", "invalid_image", "is not an image"),
    ("/noise.png", "invalid_image", "image"),
])
def test_remote_image_refused(server: ServerProcess, client: openai.OpenAI, path: str,
                              code: str | None, words: str) -> None:
    with image_server() as base, pytest.raises(openai.BadRequestError) as error:
        send_image_url(server, client, base + path)
    assert error.value.status_code == 400 and error.value.param == IMAGE_PARAM
    assert error.value.code == code and words in error.value.message
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("path", ["/stall-headers.png", "/stall-body.png"])
def test_remote_image_that_stalls_times_out(server: ServerProcess, client: openai.OpenAI,
                                            path: str) -> None:
    # The image server stalls for 60 s; the server gives up after --image-timeout
    # (2 s) and answers. The bound below only catches a fetch that waits for the stall.
    with image_server() as base:
        start = time.monotonic()
        with pytest.raises(openai.BadRequestError) as error:
            send_image_url(server, client, base + path)
        elapsed = time.monotonic() - start
    assert error.value.code == "image_fetch_timeout" and error.value.param == IMAGE_PARAM
    assert f"longer than {IMAGE_TIMEOUT_S} s" in error.value.message
    assert IMAGE_TIMEOUT_S * 0.9 <= elapsed < 45


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
    preflight = httpx2.options(f"{server.base_url}/chat/completions", headers={
        "Origin": "http://evil", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code in (401, 405)
    assert httpx2.get(f"{server.root_url}/health").json()["status"] == "ok"  # still up


def _short_id(chunk_line: bytes) -> str:
    match = re.search(rb'"id": ?"chatcmpl-([0-9a-f]{8})', chunk_line)
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


def test_disconnect_stops_a_non_streaming_request(server: ServerProcess,
                                                  client: openai.OpenAI) -> None:
    """A client that gives up on a non-streaming reply (closes its connection) stops the
    generation: the slot is free for the next request, and nothing lands in the log but
    the cancellation."""
    import socket

    body = json.dumps({"model": server.model_id(), "max_tokens": 4000, **LONG,
                       "messages": [{"role": "user", "content": "Write a long essay."}]})
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    seen = len(server.log())
    started = re.compile(r"([0-9a-f]{8}) started")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 120
        while not (match := started.search(server.log()[seen:])):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        short = match.group(1)
        # Generating: the client goes away without reading the reply.
    pattern = re.compile(rf"{short} (cancelled after (\d+) tokens|done)")
    while not (ended := pattern.search(server.log())):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert ended.group(2) is not None, f"the reply ran to its end: {ended.group(0)}"
    assert int(ended.group(2)) < 4000
    # The decoder is free: the next request is served at once, nothing is queued.
    assert ask(client, server.model_id(), "hi", max_tokens=2).choices[0].finish_reason
    assert httpx2.get(f"{server.root_url}/health").json()["waiting"] == 0
    assert "Traceback" not in server.log() and "Exception" not in server.log()


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
        next(line for line in lines if line.startswith("data: {") and  # the long reply
             json.loads(line[6:])["choices"][0]["delta"].get("content"))  # holds the decoder
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
