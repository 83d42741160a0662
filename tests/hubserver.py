"""A Hugging Face Hub on 127.0.0.1 for tests: a real threaded HTTP server that speaks the
parts of the Hub protocol huggingface_hub 2.4 uses to download files.

- GET /api/models/{repo}[/revision/{rev}]?blobs=true -> model info with every file's size
  and LFS sha256 (what `model_info(files_metadata=True)` reads).
- HEAD and GET /{repo}/resolve/{rev}/{file} -> the file, with X-Repo-Commit, ETag and
  X-Linked-Etag (the sha256), X-Linked-Size, Content-Length, Accept-Ranges, and 206
  partial content for `Range: bytes=N-` requests.
- LFS files on a CDN (optional): resolve answers 302 to http://localhost:{port}/cdn/{sha}
  (another origin than 127.0.0.1, so clients must not send the token there).
- Errors as the Hub sends them: 401 + X-Error-Code RepoNotFound for unknown repos, 401
  GatedRepo for gated repos without a token, 404 EntryNotFound for unknown files, 401
  "Invalid credentials" for a bad token (any token starting with hf_bad).

Faults for tests: drop the connection after N body bytes, serve corrupted bytes of the
right size, send slowly, pause at a byte offset until the test says go on, or refuse
data requests (503). Every request is recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    """One file of a repository and the faults to apply to it."""

    data: bytes
    drop_after: int | None = None   # close the connection after this many body bytes ...
    drops: int = 0                  # ... this many times
    corrupt: bool = False           # flip a byte in the middle (same size)
    bytes_per_s: float | None = None  # throttle the body
    fail_gets: int = 0              # then answer this many data GETs with 503
    cdn: bool = False               # redirect to another host, as the Hub does for LFS
    pause_at: int | None = None     # stop sending once the body reaches this byte (once),
    paused: threading.Event = field(default_factory=threading.Event)  # ... set then,
    resume: threading.Event = field(default_factory=threading.Event)  # ... until this is set

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Repo:
    files: dict[str, Served] = field(default_factory=dict)
    gated_token: str | None = None  # the token a gated repo accepts


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


class HubState:
    """The server's repositories and the log of requests it saw."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def add(self, repo: str, file: str, data: bytes, **faults: object) -> Served:
        served = Served(data, **faults)  # type: ignore[arg-type]
        self.repos.setdefault(repo, Repo()).files[file] = served
        return served

    def data_requests(self, file: str) -> list[Request]:
        """The GETs that fetched a file's bytes."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + file)
                and "/resolve/" in r.path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _record(self) -> None:
        with self.state.lock:
            self.state.requests.append(Request(self.command, unquote(urlparse(self.path).path),
                                               self.headers.get("Range"),
                                               self.headers.get("Authorization")))

    def _error(self, status: int, code: str, message: str = "") -> None:
        body = json.dumps({"error": message or code}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self, head: bool) -> None:
        self._record()
        path = unquote(urlparse(self.path).path)
        if (self.headers.get("Authorization") or "").startswith("Bearer hf_bad"):
            # What the Hub answers to a revoked or mistyped token.
            self._error(401, "", "Invalid credentials in Authorization header")
            return
        if path.startswith("/api/models/"):
            self._model_info(path[len("/api/models/"):])
        elif path.startswith("/cdn/"):
            self._cdn(path[len("/cdn/"):], head)
        elif "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            _, _, file = rest.partition("/")
            self._resolve(repo, file, head)
        else:
            self._error(404, "NotFound")

    def _model_info(self, rest: str) -> None:
        repo_id = rest.split("/revision/")[0]
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return
        siblings = [{"rfilename": name, "size": len(f.data), "blobId": f.sha256[:40],
                     "lfs": {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}}
                    for name, f in repo.files.items()]
        body = json.dumps({"id": repo_id, "sha": COMMIT, "siblings": siblings,
                           "gated": "manual" if repo.gated_token else False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, repo_id: str, file: str, head: bool) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            self._error(401, "GatedRepo", "Access to this model is restricted")
            return
        served = repo.files.get(file)
        if served is None:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        if not head and served.fail_gets > 0 and served.drops == 0:  # drops come first
            served.fail_gets -= 1
            self._error(503, "ServiceUnavailable")
            return
        if served.cdn:
            self._redirect(served)
            return
        self._send_file(served, head)

    def _redirect(self, served: Served) -> None:
        port = self.server.server_address[1]
        self.send_response(302)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{served.sha256}"')
        self.send_header("X-Linked-Etag", f'"{served.sha256}"')
        self.send_header("X-Linked-Size", str(len(served.data)))
        self.send_header("Location", f"http://localhost:{port}/cdn/{served.sha256}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cdn(self, sha: str, head: bool) -> None:
        for repo in self.state.repos.values():
            for served in repo.files.values():
                if served.sha256 == sha:
                    self._send_file(served, head)
                    return
        self._error(404, "NotFound")

    def _send_file(self, served: Served, head: bool) -> None:
        data = bytearray(served.data)
        if served.corrupt:
            data[len(data) // 2] ^= 0xFF
        start = 0
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes=") and not head:
            start = int(byte_range[len("bytes="):].split("-")[0])
        body = bytes(data[start:])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{served.sha256}"')
        self.send_header("X-Linked-Etag", f'"{served.sha256}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        limit = len(body)
        if served.drop_after is not None and served.drops > 0:
            served.drops -= 1
            limit = max(served.drop_after - start, 0)
            self.close_connection = True
        pause = served.pause_at
        if pause is not None and start <= pause < start + limit:
            served.pause_at = None
            if not self._write(body[:pause - start], served.bytes_per_s):
                return
            with contextlib.suppress(OSError):
                self.wfile.flush()
            served.paused.set()
            served.resume.wait(timeout=120)  # bounded: a failed test must not hang
            self._write(body[pause - start:limit], served.bytes_per_s)
        else:
            self._write(body[:limit], served.bytes_per_s)
        if limit < len(body):
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(2)

    def _write(self, body: bytes, bytes_per_s: float | None) -> bool:
        """Send `body`; False when the client went away."""
        step = 64 * 1024
        for i in range(0, len(body), step):
            try:
                self.wfile.write(body[i:i + step])
            except OSError:
                return False
            if bytes_per_s:
                time.sleep(step / bytes_per_s)
        return True


@contextlib.contextmanager
def running_hub() -> Iterator[tuple[str, HubState]]:
    """Start a Hub on a free port; yields its URL and state."""
    state = HubState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def write_small_gguf(path: Path, n_bytes: int = 2 * 1024 * 1024, seed: int = 0) -> Path:
    """A small valid GGUF (random F32 tensors) of about `n_bytes`, for download tests."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"download test {seed}")
    rng = np.random.default_rng(seed)
    per = max(n_bytes // 4 // 4, 1)
    for i in range(4):
        writer.add_tensor(f"t{i}", rng.standard_normal(per).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
