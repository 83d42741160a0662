"""`localsmall serve` as a real subprocess on 127.0.0.1 for the server tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240  # loading shares a busy CPU: generous, and only an upper bound


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def model_id(self) -> str:
        return self.stdout.read_text().split("model: ", 1)[1].strip()

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server did not stop within {timeout} s") from None


def _env(home: Path) -> dict[str, str]:
    machine = home / "machine.json"
    machine.write_text(json.dumps({
        "gpus": [], "gpu_offload": False, "ram_total": 64 * 1024**3,
        "ram_available": 58 * 1024**3,
        "cpu": {"model": "test CPU", "physical_cores": 8, "logical_cores": 16}}))
    env = dict(os.environ, LOCALSMALL_HOME=str(home / "localsmall"), HF_HOME=str(home / "hf"),
               HF_HUB_OFFLINE="1", LOCALSMALL_HARDWARE=str(machine), PYTHONPATH=str(ROOT),
               NO_COLOR="1", COLUMNS="200")
    env.pop("LOCALSMALL_API_KEY", None)
    env.pop("LOCALSMALL_DEBUG", None)
    return env


@contextlib.contextmanager
def running_server(home: Path, args: list[str], *, api_key: str | None = None
                   ) -> Iterator[ServerProcess]:
    """Start `localsmall serve ARGS --port P` and wait until /health says ready."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    stdout, stderr = home / "serve.out", home / "serve.err"
    env = _env(home)
    if api_key:
        env["LOCALSMALL_API_KEY"] = api_key
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "localsmall", "serve", *args,
                                 "--port", str(port)], stdout=out, stderr=err, env=env,
                                cwd=str(ROOT))
    server = ServerProcess(proc, port, stdout, stderr, api_key)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}):\n{server.log()}")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{server.root_url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not start:\n{server.log()}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
