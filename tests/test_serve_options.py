"""`localsmall serve` options beyond the defaults: `--cors` for browser pages (a real
server on 127.0.0.1), and /health while the model is still loading."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings
from localsmall.errors import ModelLoadError
from localsmall.server.app import ServerConfig
from localsmall.server.runner import Listening, Load, Ready, serve
from tests.conftest import TinyModels
from tests.serveprocess import ServerProcess, running_server

KEY = "cors-key-123"
ALLOWED = "http://app.example"


@pytest.fixture(scope="module")
def cors_server(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    args = ["--model", str(tiny.f16), "--no-vision", "--ctx", "2048", "--gpu-layers", "0",
            "--threads", "1", "--temperature", "0", "--cors", ALLOWED]
    with running_server(tmp_path_factory.mktemp("cors"), args, api_key=KEY) as running:
        yield running


def _preflight(server: ServerProcess, origin: str) -> httpx2.Response:
    return httpx2.options(f"{server.base_url}/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_preflight_and_headers(cors_server: ServerProcess) -> None:
    server = cors_server
    # The preflight needs no key (browsers send none) and allows what a page sends.
    preflight = _preflight(server, ALLOWED)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed_headers = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    auth = {"Authorization": f"Bearer {KEY}", "Origin": ALLOWED}
    models = httpx2.get(f"{server.base_url}/models", headers=auth)
    assert models.status_code == 200
    assert models.headers["access-control-allow-origin"] == ALLOWED
    reply = httpx2.post(f"{server.base_url}/chat/completions", headers=auth, timeout=120,
                        json={"model": server.model_id(), "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["choices"]
    assert reply.headers["access-control-allow-origin"] == ALLOWED
    # A page can read why it was refused.
    refused = httpx2.get(f"{server.base_url}/models", headers={"Origin": ALLOWED})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED


def test_cors_refuses_other_origins(cors_server: ServerProcess) -> None:
    server = cors_server
    evil = "http://evil.example"
    assert "access-control-allow-origin" not in _preflight(server, evil).headers
    page = httpx2.get(f"{server.base_url}/models",
                      headers={"Authorization": f"Bearer {KEY}", "Origin": evil})
    assert page.status_code == 200 and "access-control-allow-origin" not in page.headers


class InProcess:
    """`serve()` from the library on a thread, over a load the test controls."""

    def __init__(self, load: Load) -> None:
        self.stop = threading.Event()
        self.listening: list[Listening] = []
        self.ready: list[Ready] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(load,), daemon=True)

    def _run(self, load: Load) -> None:
        try:
            serve(config=CONFIG, load=load, host="127.0.0.1", port=0, system_prompt="",
                  max_queue=2, on_listening=self.listening.append,
                  on_ready=self.ready.append, stop=self.stop)
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> str:
        """Start it; the root URL once it listens."""
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.listening:
            assert self.thread.is_alive() and time.monotonic() < deadline, self.errors
            time.sleep(0.02)
        return self.listening[0].url.removesuffix("/v1")

    def join(self) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive(), "serve() did not return"


CONFIG = ServerConfig(model_ids=("tiny",))
CHAT = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def test_health_says_loading_until_the_model_is_ready(tiny: TinyModels) -> None:
    """The server answers while the model loads (the load is held until the test has
    looked: nothing depends on how long loading takes)."""
    release = threading.Event()

    def load() -> tuple[Engine, ServerConfig]:
        assert release.wait(120)
        engine = Engine(EngineSettings(model_path=tiny.f16, n_ctx=1024, n_threads=1))
        return engine, CONFIG

    server = InProcess(load)
    root = server.start()
    try:
        health = httpx2.get(f"{root}/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        chat = httpx2.post(f"{root}/v1/chat/completions", json=CHAT)
        assert chat.status_code == 503 and chat.headers["retry-after"].isdigit()
        error = chat.json()["error"]
        assert error["code"] == "model_loading" and "still loading" in error["message"]
        assert httpx2.get(f"{root}/v1/models").json()["data"][0]["id"] == "tiny"
        assert not server.ready
        release.set()
        deadline = time.monotonic() + 120
        while (health := httpx2.get(f"{root}/health")).status_code == 503:
            assert health.json() == {"status": "loading"}
            assert time.monotonic() < deadline and not server.errors, server.errors
            time.sleep(0.05)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert server.ready == [Ready(slots=1)]
        reply = httpx2.post(f"{root}/v1/chat/completions", json=CHAT, timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        release.set()
        server.stop.set()
        server.join()
    assert not server.errors


def test_a_failed_load_ends_serving_with_its_error() -> None:
    def load() -> tuple[Engine, ServerConfig]:
        raise ModelLoadError("llama.cpp could not load broken.gguf")

    server = InProcess(load)
    server.start()
    server.join()  # without stop being set: the failure ends serving
    assert len(server.errors) == 1 and isinstance(server.errors[0], ModelLoadError)


def test_cli_load_failure_is_one_clean_line(tmp_path: Path) -> None:
    """A GGUF the planner reads but llama.cpp cannot load: the same one-line error as
    before the server listened first, and a non-zero exit."""
    from typer.testing import CliRunner

    from localsmall.cli import app

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 16)
    result = CliRunner().invoke(app, ["serve", "--model", str(broken), "--port", "0",
                                      "--gpu-layers", "0", "--ctx", "1024"])
    output = " ".join(result.output.split())  # the terminal wraps long lines
    assert result.exit_code == 1 and "Traceback" not in output
    assert output.count("error:") == 1 and "could not load" in output
    assert output.index("loading the model") < output.index("error: llama.cpp could not load")


def test_stopping_while_loading_stops_the_load() -> None:
    """Ctrl-C or SIGTERM while the model loads: the load is asked to stop as Ctrl-C asks
    it (the flag llama.cpp's load progress callback reads), serve() returns without an
    error, and no request to stop is left behind for later work."""
    from localsmall import interrupt

    asked = threading.Event()

    def load() -> tuple[Engine, ServerConfig]:
        deadline = time.monotonic() + 120
        while not interrupt.requested():  # what load_model's progress callback reads
            assert time.monotonic() < deadline, "the load was never asked to stop"
            time.sleep(0.01)
        asked.set()
        interrupt.take()
        raise KeyboardInterrupt  # as load_model raises after an interrupted load

    server = InProcess(load)
    root = server.start()
    assert httpx2.get(f"{root}/health").json() == {"status": "loading"}
    server.stop.set()
    server.join()
    assert asked.is_set() and not server.errors and not server.ready
    assert not interrupt.requested()
