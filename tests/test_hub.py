"""Pulling from a Hub on 127.0.0.1: verified, resumable (in the run and across runs),
corrupt files refused, Hub errors explained, offline mode and a full disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localsmall.errors import DiskSpaceError, HubError, VerificationError
from localsmall.hub import cache as hubcache
from localsmall.hub import pull as hub
from localsmall.hub.remote import RemoteFile
from tests.conftest import LocalHub, go_offline
from tests.hubserver import write_small_gguf

REPO = "org/models"
FILE = "model-Q4_K_M.gguf"
MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from localsmall.hub import download

    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.01)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", 3 * MIB).read_bytes()


def _remote(data: bytes, file: str = FILE, repo: str = REPO) -> RemoteFile:
    return RemoteFile(repo=repo, file=file, size=len(data))


def test_pull_verifies_and_uses_the_standard_cache(hub: LocalHub, gguf_bytes: bytes) -> None:
    served = hub.state.add(REPO, FILE, gguf_bytes)
    result = hub_pull(_remote(gguf_bytes))
    pulled = result.files[0]
    assert pulled.sha256 == served.sha256 and pulled.downloaded == len(gguf_bytes)
    # The layout huggingface_hub itself uses: a snapshot link to a blob named by sha256.
    assert pulled.path.parent.parent.name == "snapshots" and pulled.path.is_symlink()
    assert Path(os.path.realpath(pulled.path)).name == served.sha256
    assert pulled.path.read_bytes() == gguf_bytes
    assert hubcache.verified_sha256(pulled.path) == served.sha256
    again = hub_pull(_remote(gguf_bytes)).files[0]
    assert again.downloaded == 0
    assert len(hub.state.data_requests(FILE)) == 1  # the second pull downloaded nothing


def test_dropped_connection_resumes_from_the_last_byte(hub: LocalHub,
                                                       gguf_bytes: bytes) -> None:
    hub.state.add(REPO, FILE, gguf_bytes, drop_after=1_234_567, drops=1)
    pulled = hub_pull(_remote(gguf_bytes)).files[0]
    ranges = [r.range for r in hub.state.data_requests(FILE)]
    assert ranges == [None, "bytes=1234567-"]
    assert pulled.path.read_bytes() == gguf_bytes


def test_a_later_run_resumes_what_a_failed_run_kept(hub: LocalHub, gguf_bytes: bytes) -> None:
    # The connection drops, then the Hub fails: this run gives up, keeping the bytes.
    hub.state.add(REPO, FILE, gguf_bytes, drop_after=1_000_000, drops=1, fail_gets=1)
    with pytest.raises(HubError, match=r"pull x.*again"):
        hub_pull(_remote(gguf_bytes))
    assert hubcache.cached_file(_remote(gguf_bytes)) is None  # nothing half-done is used
    pulled = hub_pull(_remote(gguf_bytes)).files[0]
    assert pulled.resumed_from == 1_000_000
    assert pulled.downloaded == len(gguf_bytes) - 1_000_000
    assert hub.state.data_requests(FILE)[-1].range == "bytes=1000000-"
    assert pulled.path.read_bytes() == gguf_bytes


def test_a_killed_process_is_resumed_by_the_next_one(hub: LocalHub, gguf_bytes: bytes,
                                                     tmp_path: Path) -> None:
    # The server stops at 1 MiB and waits: the child is killed while it is in the middle
    # of the download, however fast or slow the machine is.
    pause_at = MIB
    served = hub.state.add(REPO, FILE, gguf_bytes, pause_at=pause_at)
    # An orphan huggingface_hub left behind when its process was killed.
    blobs = hubcache.repo_dir(REPO) / "blobs"
    blobs.mkdir(parents=True)
    orphan = blobs / "0badc0de.1234abcd.incomplete"
    orphan.write_bytes(b"x" * 100)
    script = ("from localsmall.hub import pull as hub; "
              "from localsmall.hub.remote import RemoteFile; "
              f"hub.pull([RemoteFile({REPO!r}, {FILE!r}, {len(gguf_bytes)})], pull_ref='x')")
    child = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(),
                             cwd=Path(__file__).parent.parent)
    try:
        assert served.paused.wait(timeout=120), "the child never started downloading"
        # What the server sent is on disk, apart from what may wait in the child's file
        # buffer (its writes go through a buffered file).
        partial = None
        deadline = time.monotonic() + 120
        while partial is None and time.monotonic() < deadline:
            partials = hubcache.partial_downloads(REPO)
            if partials and partials[0].size >= pause_at - 64 * 1024:
                partial = partials[0]
            else:
                time.sleep(0.02)
        assert partial is not None, "the received bytes never reached the disk"
        assert child.poll() is None  # still waiting for the rest
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        served.resume.set()
    kept = partial.path.stat().st_size
    assert 0 < kept <= pause_at
    pulled = hub_pull(_remote(gguf_bytes)).files[0]
    assert hub.state.data_requests(FILE)[-1].range == f"bytes={kept}-"
    assert pulled.resumed_from == kept and pulled.downloaded == len(gguf_bytes) - kept
    assert pulled.path.read_bytes() == gguf_bytes
    assert not orphan.exists() and not hubcache.partial_downloads(REPO)


def test_corrupt_download_is_refused_and_a_repull_fixes_it(hub: LocalHub,
                                                          gguf_bytes: bytes) -> None:
    served = hub.state.add(REPO, FILE, gguf_bytes, corrupt=True)
    with pytest.raises(VerificationError, match=r"arrived damaged.*pull x"):
        hub_pull(_remote(gguf_bytes))
    assert hubcache.cached_file(_remote(gguf_bytes)) is None
    assert not hubcache.partial_downloads(REPO)
    served.corrupt = False
    assert hub_pull(_remote(gguf_bytes)).files[0].path.read_bytes() == gguf_bytes


def test_damaged_cached_file_is_replaced(hub: LocalHub, gguf_bytes: bytes) -> None:
    hub.state.add(REPO, FILE, gguf_bytes)
    path = hub_pull(_remote(gguf_bytes)).files[0].path
    blob = Path(os.path.realpath(path))
    damaged = bytearray(blob.read_bytes())
    damaged[100] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(damaged))
    repaired = hub_pull(_remote(gguf_bytes)).files[0]
    assert repaired.repaired and repaired.downloaded == len(gguf_bytes)
    assert repaired.path.read_bytes() == gguf_bytes


def test_catalog_hash_must_match_the_hub(hub: LocalHub, gguf_bytes: bytes) -> None:
    hub.state.add(REPO, FILE, gguf_bytes)
    pinned = RemoteFile(REPO, FILE, len(gguf_bytes), sha256="0" * 64)
    with pytest.raises(VerificationError, match=r"replaced upstream"):
        hub_pull(pinned)


def test_missing_repo_file_and_gated_repo(hub: LocalHub, gguf_bytes: bytes,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError, match=r"org/nope was not found.*HF_TOKEN"):
        hub_pull(_remote(gguf_bytes, repo="org/nope"))
    hub.state.add(REPO, FILE, gguf_bytes)
    with pytest.raises(HubError, match=r"no file other\.gguf"):
        hub_pull(_remote(gguf_bytes, file="other.gguf"))
    hub.state.add("org/gated", FILE, gguf_bytes)
    hub.state.repos["org/gated"].gated_token = "hf_secret"
    with pytest.raises(HubError, match=r"gated: accept its licence.*HF_TOKEN"):
        hub_pull(_remote(gguf_bytes, repo="org/gated"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub_pull(_remote(gguf_bytes, repo="org/gated")).files[0].downloaded
    monkeypatch.setenv("HF_TOKEN", "hf_bad_token")
    with pytest.raises(HubError, match=r"401 unauthorized\): HF_TOKEN is missing or not valid"):
        hub_pull(_remote(gguf_bytes))


def test_cdn_redirects_get_no_token_and_resume(hub: LocalHub, gguf_bytes: bytes,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.state.add(REPO, FILE, gguf_bytes, cdn=True, drop_after=2_000_000, drops=1)
    pulled = hub_pull(_remote(gguf_bytes)).files[0]
    assert pulled.path.read_bytes() == gguf_bytes
    cdn = [r for r in hub.state.requests if r.path.startswith("/cdn/")]
    assert [r.range for r in cdn if r.method == "GET"] == [None, "bytes=2000000-"]
    assert all(r.authorization is None for r in cdn)
    resolve = [r for r in hub.state.requests if "/resolve/" in r.path]
    assert all(r.authorization == "Bearer hf_secret" for r in resolve)


def test_unreachable_hub_is_explained(monkeypatch: pytest.MonkeyPatch, hub: LocalHub,
                                      gguf_bytes: bytes) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(HubError, match=r"connection to http://127\.0\.0\.1:9 failed"):
        hub_pull(_remote(gguf_bytes))


def test_offline_uses_the_cache_without_network(hub: LocalHub, gguf_bytes: bytes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    hub.state.add(REPO, FILE, gguf_bytes)
    hub_pull(_remote(gguf_bytes))
    seen = len(hub.state.requests)
    go_offline(monkeypatch)
    assert hub_pull(_remote(gguf_bytes)).files[0].path.read_bytes() == gguf_bytes
    assert len(hub.state.requests) == seen
    with pytest.raises(HubError, match=r"not downloaded and HF_HUB_OFFLINE.*localsmall pull x"):
        hub_pull(_remote(gguf_bytes, file="other.gguf"))
    assert len(hub.state.requests) == seen


def test_full_disk_is_refused_before_downloading(hub: LocalHub, gguf_bytes: bytes,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hub.state.add(REPO, FILE, gguf_bytes)
    monkeypatch.setattr(hubcache, "free_disk", lambda path: MIB)
    with pytest.raises(DiskSpaceError, match=r"not enough free disk space"):
        hub_pull(_remote(gguf_bytes))
    assert not hub.state.data_requests(FILE)


def hub_pull(remote: RemoteFile) -> hub.PullResult:
    return hub.pull([remote], pull_ref="x")
