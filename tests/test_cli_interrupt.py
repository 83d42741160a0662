"""Ctrl-C (a real SIGINT) on `run`, `bench`, `convert` and `pull` in a separate process:
exit code 130, one clean line on stderr, no traceback, no file half-written.

Each process is interrupted once it shows it is busy (text streaming, llama.cpp's log, a
quant being written, a download under way), and the work is long enough (replies without
a length limit, many repetitions, a throttled server) that it cannot end on its own
first, so the tests do not depend on the machine's speed."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from localsmall.gguf_header import read_header

WAIT_S = 180.0


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "localsmall", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ))


def _wait_for(stream: IO[bytes], marker: bytes, child: subprocess.Popen[bytes]) -> bytes:
    """Read `stream` until `marker` appears (or fail if the child ends first)."""
    seen = b""
    deadline = time.monotonic() + WAIT_S
    fd = stream.fileno()
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in time: {seen[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"the process ended early (rc {child.poll()}): {seen[-500:]!r}"
            seen += chunk
    return seen


def _interrupted(child: subprocess.Popen[bytes]) -> str:
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=WAIT_S)
    text = err.decode("utf-8", errors="replace")
    assert child.returncode == 130, text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[-1] == "error: interrupted", text
    return text


def test_run_stops_while_streaming(tiny) -> None:
    child = _start("run", "--model", str(tiny.f16), "--ctx", "4096", "--threads", "2",
                   "--temperature", "0", "Tell me a very long story.")
    assert child.stdout is not None
    _wait_for(child.stdout, b" ", child)  # the reply is streaming
    _interrupted(child)


def test_run_stops_while_reading_the_prompt(tiny) -> None:
    # A long prompt on stdin, read with llama.cpp's logs shown: interrupt once the model
    # is loaded, while the prompt is read or the first tokens come.
    child = subprocess.Popen(
        [sys.executable, "-m", "localsmall", "run", "--model", str(tiny.f16), "--ctx",
         "8192", "--threads", "2", "--batch", "64", "--verbose", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ))
    assert child.stdin is not None and child.stderr is not None
    child.stdin.write(("words to read " * 1500).encode())
    child.stdin.close()
    child.stdin = None  # communicate() must not touch it again
    _wait_for(child.stderr, b"llama_context", child)  # loaded: the context is being made
    time.sleep(0.5)
    _interrupted(child)


def test_bench_stops_and_writes_no_results(tiny, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    child = _start("bench", "--model", str(tiny.f16), "-p", "64", "-n", "500", "-r", "200",
                   "--threads", "2", "--no-vision", "--verbose", "--out", str(out))
    assert child.stderr is not None
    _wait_for(child.stderr, b"llama_context", child)
    time.sleep(1.0)
    _interrupted(child)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a partial result file was left"


def test_convert_stops_and_leaves_nothing(tmp_path: Path) -> None:
    from tests.checkpoints import write_text_checkpoint
    from tests.tinymodels import write_v11_tekken

    tekken = write_v11_tekken(tmp_path / "tekken.json")
    source = write_text_checkpoint(tmp_path / "small-mistral", tekken)
    out = tmp_path / "out"
    child = _start("convert", str(source), "--out", str(out), "--outtype", "f16",
                   "--quant", "Q4_K_M,Q5_K_M,Q6_K,Q8_0", "--threads", "1")
    # Interrupt while llama.cpp's quantizer writes the first quant (a child process).
    deadline = time.monotonic() + WAIT_S
    while not any(".partial" in p.name and "Q4_K_M" in p.name
                  for p in (out.iterdir() if out.exists() else ())):
        assert child.poll() is None, child.communicate()[1].decode()
        assert time.monotonic() < deadline, "the quantizer never started"
        time.sleep(0.01)
    _interrupted(child)
    left = sorted(p.name for p in out.rglob("*"))
    # The F16 file was finished before quantizing began; no quant was.
    assert left == ["small-mistral-F16.gguf"], left
    header = read_header(out / left[0])
    assert header.tensors and header.data_end <= header.file_size


def test_pull_stops_and_keeps_only_a_resumable_partial(hub, tmp_path: Path) -> None:
    from localsmall.models.catalog import load_catalog
    from tests.hubserver import write_small_gguf

    q2 = load_catalog().default.quant("Q2_K").remote
    data = write_small_gguf(tmp_path / "q2.gguf", 2 * 1024 * 1024).read_bytes()
    hub.state.add(q2.repo, q2.file, data, bytes_per_s=256 * 1024)  # 8 s to send
    child = _start("pull", "mistral-small-3.2:Q2_K", "--no-vision", "--yes")
    deadline = time.monotonic() + WAIT_S
    while not hub.state.data_requests(q2.file):
        assert child.poll() is None, child.communicate()[1].decode()
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    time.sleep(0.5)
    _interrupted(child)
    cache = Path(os.environ["HF_HUB_CACHE"])
    # No file under its final name: only the partial blob a later pull resumes from.
    files = [p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert files and all(".localsmall.incomplete" in p.name for p in files), files
    assert not any(p.name == q2.file for p in cache.rglob("*"))
