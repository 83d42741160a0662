"""The server's default system prompt, warmed into a slot as it starts (server.warmup):
read in the background and saved on a first start, restored by the next, requests that
come meanwhile wait for it and answer as without it; a damaged state is read again with
a notice, and stopping during the read leaves nothing behind. `serve()` from the library
over the real tiny model, and the `localsmall serve` command as a subprocess."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2

from localsmall import interrupt, paths
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings
from localsmall.server.app import ServerConfig
from localsmall.server.runner import Listening, Ready, serve
from localsmall.server.warmup import SystemPrompt
from tests.conftest import TinyModels
from tests.serveprocess import running_server

SYSTEM = "You are a careful assistant. " + " ".join(f"rule{i} applies." for i in range(40))
CONFIG = ServerConfig(model_ids=("tiny",))
WAIT_S = 120  # upper bounds only: nothing here depends on how fast the machine is


def ask(root: str, text: str, *, system: str | None = None, model: str = "tiny"
        ) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    reply = httpx2.post(f"{root}/v1/chat/completions", timeout=WAIT_S, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def text_of(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


def cached(body: dict[str, Any]) -> int:
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def health(root: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx2.get(f"{root}/health").json()
    return body


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


class Server:
    """`serve()` on a thread over the tiny model with SYSTEM as its system prompt.
    `hold`: the background read waits for `release` before it reads anything."""

    def __init__(self, tiny: TinyModels, *, warm: bool = True, hold: bool = False) -> None:
        self.tiny, self.hold = tiny, hold
        self.stop = threading.Event()
        self.held, self.release = threading.Event(), threading.Event()
        self.awaited = threading.Event()  # a request waits for the read (Engine.wait_ahead)
        self.listening: list[Listening] = []
        self.ready: list[Ready] = []
        self.log: list[str] = []
        self.errors: list[BaseException] = []
        self.engine: Engine | None = None
        self.thread = threading.Thread(target=self._run, args=(warm,), daemon=True)

    def _load(self) -> tuple[Engine, ServerConfig]:
        engine = Engine(EngineSettings(model_path=self.tiny.f16, n_ctx=2048, n_threads=1,
                                       n_seq=2))
        if self.hold:
            evaluate = engine._evaluate

            def held(*args: Any, **kwargs: Any) -> Any:
                stop = engine._stop  # the read's own stop event (a server stopping)
                if threading.current_thread().name == "localsmall-read-ahead":
                    self.held.set()
                    deadline = time.monotonic() + WAIT_S
                    while not (self.release.is_set() or (stop and stop.is_set())):
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                return evaluate(*args, **kwargs)
            engine._evaluate = held  # type: ignore[method-assign]
            wait_ahead = engine.wait_ahead

            def awaited(*args: Any, **kwargs: Any) -> Any:
                self.awaited.set()
                return wait_ahead(*args, **kwargs)
            engine.wait_ahead = awaited  # type: ignore[method-assign]
        self.engine = engine
        return engine, CONFIG

    def _run(self, warm: bool) -> None:
        try:
            serve(config=CONFIG, load=self._load, host="127.0.0.1", port=0,
                  system_prompt=SYSTEM, max_queue=4, on_listening=self.listening.append,
                  on_ready=self.ready.append, on_log=lambda e: self.log.append(e.message),
                  stop=self.stop, warm_system=warm)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> str:
        """Start it and wait until it is ready; its root URL."""
        self.thread.start()
        wait_for(lambda: bool(self.ready) or not self.thread.is_alive(), "ready")
        assert self.ready, self.errors
        return self.listening[0].url.removesuffix("/v1")

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.stop.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "serve() did not return"

    @property
    def warm(self) -> SystemPrompt | None:
        return self.ready[0].system_prompt


def states() -> list[Path]:
    folder = paths.cache_dir() / "system-prompts"
    return sorted(folder.iterdir()) if folder.is_dir() else []


OWN = "You are terse."  # a system prompt of the client's own


def references(tiny: TinyModels) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replies without any warm-up: to "Hello there" with the default system prompt,
    and with OWN."""
    with Server(tiny, warm=False) as root:
        return ask(root, "Hello there"), ask(root, "Hello there", system=OWN)


def test_read_then_saved_then_restored(tiny: TinyModels) -> None:
    with Server(tiny, warm=False) as root:  # the reference: no warm-up at all
        plain = ask(root, "Hello there")
        assert "system_prompt" not in health(root) and not states()
    first = Server(tiny)
    with first as root:
        assert first.warm is not None and first.warm.state == "reading"
        n = first.warm.tokens
        reply = ask(root, "Hello there")         # waits for the read, then borrows it
        assert cached(reply) >= n and text_of(reply) == text_of(plain)
        assert cached(plain) == 0
        assert health(root) | {"waiting": 0} == {
            "status": "ok", "model": "tiny", "waiting": 0, "slots": 2,
            "system_prompt": "read", "system_prompt_tokens": n}
        assert any(line.startswith("system prompt read in") for line in first.log)
    assert [p.suffix for p in states()] == [".json", ".kvstate"]
    second = Server(tiny)
    with second as root:
        assert second.warm == SystemPrompt("restored", n, second.warm.seconds)  # type: ignore[union-attr]
        assert second.engine is not None and second.engine.decode_calls == 0  # loaded
        assert health(root)["system_prompt"] == "restored"
        again = ask(root, "Hello there")
        assert cached(again) >= n and text_of(again) == text_of(plain)


def test_requests_during_the_read_wait_and_answer_as_without_it(tiny: TinyModels) -> None:
    plain, mine = references(tiny)
    server = Server(tiny, hold=True)
    with server as root:
        assert server.held.wait(WAIT_S)
        assert health(root)["system_prompt"] == "reading"
        replies: list[dict[str, Any]] = []
        asking = threading.Thread(target=lambda: replies.append(ask(root, "Hello there")))
        asking.start()
        assert server.awaited.wait(WAIT_S)     # it waits for the read
        assert not replies and health(root)["system_prompt"] == "reading"
        server.release.set()
        asking.join(WAIT_S)
        assert len(replies) == 1 and text_of(replies[0]) == text_of(plain)
        assert cached(replies[0]) >= server.warm.tokens  # type: ignore[union-attr]
        # A request with its own system prompt: unaffected by the warm slot.
        theirs = ask(root, "Hello there", system=OWN)
        assert text_of(theirs) == text_of(mine) and cached(theirs) < 8
        assert health(root)["system_prompt"] == "read"


def test_a_request_with_its_own_system_prompt_does_not_wait_for_the_read(
        tiny: TinyModels) -> None:
    """The read is held (it would never end by itself): a request with a system prompt
    of its own cancels it instead of waiting, and answers as without the warm-up; the
    default prompt's requests then read it themselves, with the same reply."""
    plain, mine = references(tiny)
    server = Server(tiny, hold=True)
    with server as root:
        assert server.held.wait(WAIT_S)
        theirs = ask(root, "Hello there", system=OWN)   # returns though the read is held
        assert not server.awaited.is_set() and not server.release.is_set()
        assert text_of(theirs) == text_of(mine)
        assert health(root)["system_prompt"] == "cancelled"
        assert text_of(ask(root, "Hello there")) == text_of(plain)
    assert not [p for p in states() if p.suffix == ".json"]  # nothing saved half-read


def test_a_damaged_state_is_read_again_with_a_notice(tiny: TinyModels) -> None:
    with Server(tiny) as root:
        reference = ask(root, "Hello there")
    state = next(p for p in states() if p.suffix == ".kvstate")
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    server = Server(tiny)
    with server as root:
        warm = server.warm
        assert warm is not None and warm.state == "reading"
        assert warm.notice.startswith("The saved system prompt state could not be used (")
        reply = ask(root, "Hello there")
        assert text_of(reply) == text_of(reference) and cached(reply) >= warm.tokens
    restored = Server(tiny)
    with restored:                              # and saved again, sound
        assert restored.warm is not None and restored.warm.state == "restored"


def test_stopping_during_the_read_leaves_no_state(tiny: TinyModels) -> None:
    server = Server(tiny, hold=True)
    with server:
        assert server.held.wait(WAIT_S)
        server.stop.set()
        server.thread.join(WAIT_S)  # returns without the read being released
        assert not server.thread.is_alive()
    assert not server.errors and not interrupt.requested()
    assert [p.suffix for p in states()] in ([], [".kvstate"])  # never a description
    assert not [p for p in states() if p.suffix == ".json"]


def test_stopping_while_a_request_waits_for_the_read(tiny: TinyModels) -> None:
    """A request waits for the held read; stopping the server ends it with an error
    object (503), and serve() returns without the read being released."""
    server = Server(tiny, hold=True)
    replies: list[httpx2.Response] = []
    with server as root:
        assert server.held.wait(WAIT_S)
        asking = threading.Thread(target=lambda: replies.append(httpx2.post(
            f"{root}/v1/chat/completions", timeout=WAIT_S, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4})))
        asking.start()
        assert server.awaited.wait(WAIT_S)
        server.stop.set()
        server.thread.join(WAIT_S)
        assert not server.thread.is_alive() and not server.release.is_set()
        asking.join(WAIT_S)
    assert not server.errors
    assert len(replies) == 1 and replies[0].status_code == 503
    assert "shutting down" in replies[0].json()["error"]["message"]


def test_the_command_reads_then_restores(tiny: TinyModels, tmp_path: Path) -> None:
    """`localsmall serve` with the model's default system prompt: the first start
    reads it (and says so), SIGTERM stops it cleanly, the second start restores it;
    --no-system keeps nothing."""
    args = ["--model", str(tiny.f16), "--no-vision", "--ctx", "2048", "--gpu-layers", "0",
            "--threads", "1", "--slots", "2", "--temperature", "0"]
    home = tmp_path / "home"
    with running_server(home, args) as server:
        first = health(server.root_url)
        assert first["system_prompt"] in ("reading", "read")
        body = ask(server.root_url, "Hello there", model=server.model_id())
        assert cached(body) >= first["system_prompt_tokens"] >= 100
        assert server.stop(signal.SIGTERM) == 0
        log = server.log()
    assert "reading the system prompt" in log and "system prompt read in" in log
    assert "Traceback" not in log
    with running_server(home, args) as server:
        assert health(server.root_url)["system_prompt"] == "restored"
        again = ask(server.root_url, "Hello there", model=server.model_id())
        assert cached(again) >= first["system_prompt_tokens"]
        assert text_of(again) == text_of(body)
        assert server.stop(signal.SIGINT) == 0
        assert "system prompt restored from cache" in " ".join(server.log().split())
    with running_server(home, [*args, "--no-system"]) as server:
        assert "system_prompt" not in health(server.root_url)


def test_a_state_saved_by_chat_is_restored_by_the_server(tiny: TinyModels) -> None:
    """`chat` and `serve` start with the same tokens for the same system prompt: the
    state one saved (from a one-sequence context) is loaded by the other (into a slot
    of a context with several)."""
    from localsmall.chat import system_state
    from localsmall.chat.session import ChatSession
    from localsmall.engine.types import SamplingSettings

    with Engine(EngineSettings(model_path=tiny.f16, n_ctx=1024, n_threads=1)) as engine:
        session = ChatSession(engine, system_prompt=SYSTEM, sampling=SamplingSettings())
        session.start_system_prompt(system_state.state_files(engine))
        assert engine.wait_ahead() is not None
        n = len(session.system_tokens())
    server = Server(tiny)
    with server as root:
        assert server.warm == SystemPrompt("restored", n, server.warm.seconds)  # type: ignore[union-attr]
        assert cached(ask(root, "Hello there")) >= n
