"""Splitting the model over RPC workers (llama.cpp's RPC backend): real `localsmall
worker` processes on 127.0.0.1, the tiny model, greedy replies compared with a local run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.engine import rpc
from localsmall.engine.types import EngineSettings, ImageSlot, SamplingSettings, TokenRun
from localsmall.images import prepare_image_bytes
from tests.tinymodels import image_bytes

runner = CliRunner()
GREEDY = SamplingSettings(temperature=0, max_tokens=16)
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(port: int) -> subprocess.Popen[bytes]:
    """`localsmall worker` in its own process, once it answers the RPC handshake."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "localsmall", "worker", "--port", str(port),
                             "--threads", "1", "--no-cache"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        with contextlib.suppress(rpc.WorkerError):
            rpc.handshake(f"127.0.0.1:{port}", timeout=2)
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("worker did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def workers(n: int) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for _ in range(n):
            port = free_port()
            procs.append((f"127.0.0.1:{port}", start_worker(port)))
        yield procs
    finally:
        for _, proc in procs:
            stop(proc)


@pytest.fixture(scope="module")
def two_workers() -> Iterator[tuple[str, str]]:
    with workers(2) as procs:
        yield procs[0][0], procs[1][0]


def _reply(settings: EngineSettings, prompt: list[object]) -> tuple[list[int], tuple[object, ...]]:
    from localsmall.engine.model import Engine

    with Engine(settings) as engine:
        result = engine.generate(prompt, GREEDY).run()  # type: ignore[arg-type]
        return result.token_ids, engine.buffers


def _prompt(tiny: object, with_image: bool) -> list[object]:
    from localsmall.engine.model import Engine

    with Engine(EngineSettings(model_path=tiny.f16, n_ctx=1024, n_threads=1)) as engine:  # type: ignore[attr-defined]
        head = engine.tokenize("<s>[INST]What is in this picture?", special=True)
        tail = engine.tokenize("[/INST]", special=True)
    if not with_image:
        return [TokenRun(tuple(head + tail))]
    image = prepare_image_bytes(image_bytes(112, 84, seed=3), "p.png")
    return [TokenRun(tuple(head)), ImageSlot(image), TokenRun(tuple(tail))]


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_split_over_two_workers_replies_like_a_local_run(tiny, two_workers,
                                                         with_image: bool) -> None:
    prompt = _prompt(tiny, with_image)
    local = EngineSettings(model_path=tiny.f16, mmproj_path=tiny.mmproj if with_image else None,
                           n_ctx=1024, n_threads=1)
    # Both layers remote (one per worker), the output head on the second one.
    split = EngineSettings(model_path=local.model_path, mmproj_path=local.mmproj_path,
                           n_ctx=1024, n_threads=1, rpc_servers=two_workers, n_gpu_layers=3,
                           tensor_split=(1.0, 2.0))
    expected, _ = _reply(local, prompt)
    got, buffers = _reply(split, prompt)
    assert len(expected) == GREEDY.max_tokens
    assert got == expected
    for endpoint in two_workers:  # llama.cpp's own report: weights and KV on each worker
        on_worker = {b.kind for b in buffers if endpoint in b.buffer}  # type: ignore[attr-defined]
        assert {"model", "kv"} <= on_worker, (endpoint, buffers)


def test_run_with_rpc_plans_the_split_and_answers_like_local(tiny, two_workers,
                                                            make_image) -> None:
    picture = make_image("pic.png")
    flags = ["run", "Describe it", "--model", str(tiny.f16), "--mmproj", str(tiny.mmproj),
             "--image", str(picture), "--ctx", "1024", "--threads", "1", "-n", "8",
             "--temperature", "0", "--json"]
    local = runner.invoke(app, flags)
    split = runner.invoke(app, [*flags, "--rpc", ",".join(two_workers)])
    assert local.exit_code == 0, local.output
    assert split.exit_code == 0, split.output
    assert json.loads(split.stdout)["text"] == json.loads(local.stdout)["text"]


def test_a_wrong_port_is_one_clean_error(tiny) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["run", "Hi", "--model", str(tiny.f16), "--ctx", "1024",
                                 "-n", "2", "--rpc", address])
    assert result.exit_code == 1
    assert f"worker {address} refused the connection" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def _fake_worker(reply: bytes | None) -> tuple[str, threading.Thread]:
    """A server that answers the HELLO with `reply` (None: closes the connection)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            conn.recv(64)
            if reply is not None:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"127.0.0.1:{server.getsockname()[1]}", thread


def test_another_protocol_version_is_refused_in_words() -> None:
    newer = bytes([9, 1, 0, 0]) + bytes(24)
    address, thread = _fake_worker(len(newer).to_bytes(8, "little") + newer)
    with pytest.raises(rpc.WorkerError, match=r"speaks llama.cpp RPC protocol 9\.1\.0"):
        rpc.handshake(address)
    thread.join(5)
    address, thread = _fake_worker(None)  # an older server drops the newer HELLO
    with pytest.raises(rpc.WorkerError, match="closed the connection during the RPC"):
        rpc.handshake(address)
    thread.join(5)


def test_a_worker_lost_between_turns_keeps_the_conversation(tiny) -> None:
    from localsmall.chat.session import ChatSession
    from localsmall.engine.model import Engine

    with workers(1) as procs:
        endpoint, proc = procs[0]
        engine = Engine(EngineSettings(model_path=tiny.f16, n_ctx=1024, n_threads=1,
                                       rpc_servers=(endpoint,), n_gpu_layers=2))
        try:
            session = ChatSession(engine, system_prompt="", sampling=GREEDY, model_label="t")
            assert "".join(session.ask("Hello"))
            proc.kill()
            proc.wait()
            with pytest.raises(rpc.WorkerLostError, match=endpoint):
                "".join(session.ask("And then?"))
            assert [m.role for m in session.conversation.messages] == ["user", "assistant"]
        finally:
            engine.close()  # frees nothing remote: the worker is gone


def test_worker_warns_when_it_listens_beyond_loopback() -> None:
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "localsmall", "worker", "--host", "0.0.0.0",
                             "--port", str(port), "--threads", "1", "--no-cache"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not rpc.reachable(f"127.0.0.1:{port}"):
            time.sleep(0.2)
    finally:
        stop(proc)
    out, err = proc.communicate()
    assert proc.returncode == 0
    assert "localsmall chat --rpc" in out.decode()
    assert "no authentication and no encryption" in " ".join(err.decode().split())
    assert "ssh -N -L" in " ".join(err.decode().split())


def test_doctor_lists_the_workers_devices(two_workers) -> None:
    result = runner.invoke(app, ["doctor", "--json", "--rpc", ",".join(two_workers)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["rpc"]
    assert data["available"] is True
    assert [w["endpoint"] for w in data["workers"]] == list(two_workers)
    assert all(w["memory_total"] > 0 for w in data["workers"])


def strip_ansi(text: str) -> str:
    """Terminal output without its colour and cursor escape codes."""
    return re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", text)


def test_a_worker_killed_mid_reply_ends_the_chat_with_one_clean_error_and_saves_it(
        tiny, isolated_home) -> None:
    # llama.cpp's RPC client aborts the process when a worker stops answering: localsmall
    # turns that into its one-line error after saving the conversation.
    import pexpect

    from localsmall.chat.conversation import load_conversation

    with workers(2) as procs:
        env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color",
                   PYTHONPATH=str(ROOT))
        args = ["-m", "localsmall", "chat", "--model", str(tiny.f16), "--ctx", "2048",
                "--threads", "1", "--temperature", "0", "-n", "1500",
                "--rpc", ",".join(e for e, _ in procs)]
        child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8",
                              dimensions=(40, 220), timeout=120)
        child.expect("you ›")
        child.send("Tell me a very long story.\r")
        child.expect("mistral ›")
        child.expect(r"\S{3}")  # the reply is streaming
        victim, proc = procs[1]
        proc.kill()
        child.expect(pexpect.EOF)
        child.close()
        said = " ".join(strip_ansi(child.before or "").split())
    # Only the worker that was killed is named (not every worker of the session).
    assert re.search(r"error: worker " + re.escape(victim) + " stopped", said), said
    assert procs[0][0] not in said.split("error:", 1)[-1], said
    assert "mid-reply" in said and "/load" in said
    assert "Traceback" not in said and "Aborted" not in said and "ggml" not in said
    assert child.exitstatus == 1
    saved = list((isolated_home / "localsmall" / "state").glob("rescued-chat-*.json"))
    assert len(saved) == 1
    messages = load_conversation(saved[0]).messages
    assert [m.text for m in messages if m.role == "user"] == ["Tell me a very long story."]


def test_plan_reads_the_workers_memory(two_workers) -> None:
    result = runner.invoke(app, ["plan", "--json", "--rpc", ",".join(two_workers)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [w["endpoint"] for w in data["workers"]] == list(two_workers)
    assert all(w["memory_free"] > 0 for w in data["workers"])
    assert data["options"]


def test_worker_refuses_a_device_it_does_not_have() -> None:
    result = runner.invoke(app, ["worker", "--port", str(free_port()), "--device", "NOPE0"])
    assert result.exit_code == 2
    assert "no device NOPE0 here" in result.stderr


def test_worker_tensor_cache_spares_a_restarted_client_the_weights(tiny, tmp_path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "worker.log"
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "localsmall", "worker", "--port",
                                 str(port), "--threads", "1", "--cache", str(cache),
                                 "--verbose"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        while not rpc.reachable(f"127.0.0.1:{port}"):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        settings = EngineSettings(model_path=tiny.f16, n_ctx=1024, n_threads=1,
                                  rpc_servers=(f"127.0.0.1:{port}",), n_gpu_layers=3)
        prompt = _prompt(tiny, with_image=False)
        first, _ = _reply(settings, prompt)
        saved = log.read_text().count("saved to")
        # The output head (131072 x 256 F16, 64 MiB) is over llama.cpp's 10 MiB threshold.
        assert saved >= 1 and any(cache.iterdir())
        again, _ = _reply(settings, prompt)  # a new client: weights come from the cache
        assert log.read_text().count("saved to") == saved
        assert again == first
    finally:
        stop(proc)


def test_a_lost_worker_that_cannot_be_told_apart_is_not_blamed_alone(monkeypatch) -> None:
    # When no worker looks gone (a busy machine still tearing the process down), the
    # message must not claim that every worker stopped.
    monkeypatch.setattr(rpc, "lost", lambda ep: False)
    gone = rpc._find_lost(["10.0.0.1:50052", "10.0.0.2:50052"], wait=0.2)
    assert gone == []
    text = rpc._lost_message(["10.0.0.1:50052", "10.0.0.2:50052"], when="mid-reply",
                             known=bool(gone))
    assert text.startswith("one of the workers 10.0.0.1:50052, 10.0.0.2:50052 stopped")


def test_a_worker_found_gone_on_a_second_look_is_named(monkeypatch) -> None:
    looks: list[str] = []

    def lost(ep: str) -> bool:
        looks.append(ep)
        return ep == "10.0.0.2:50052" and len(looks) > 4
    monkeypatch.setattr(rpc, "lost", lost)
    assert rpc._find_lost(["10.0.0.1:50052", "10.0.0.2:50052"], wait=5) == ["10.0.0.2:50052"]
