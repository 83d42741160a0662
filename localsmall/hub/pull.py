"""Pulling files from the Hugging Face Hub into its standard cache: verified,
resumable across runs, with a free-disk check first and messages that say what to do.

What huggingface_hub does is kept (the cache layout, HF_TOKEN, HF_ENDPOINT,
HF_HUB_OFFLINE, its error types); what it does not do is added here: the sha256 of
every file is checked (against the catalog, else the Hub's LFS metadata) before the file
takes its place in the cache, and the bytes of an interrupted download are kept in a
partial file that the next pull continues (hub.download).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from localsmall.errors import DiskSpaceError, HubError, VerificationError
from localsmall.hub import cache as hubcache
from localsmall.hub.download import fetch, sha256_of
from localsmall.hub.remote import RemoteFile
from localsmall.units import gib_fixed

DISK_HEADROOM = 256 * 1024 * 1024   # keep this much free after a pull
LOCK_WAIT_S = 10.0                  # wait this long for another pull of the same file
REVISION = "main"


@dataclass(frozen=True)
class PullProgress:
    """Progress of one file: checking what is cached, verifying, or downloading."""

    file: str
    stage: Literal["verify", "download"]
    done: int
    total: int


PullCallback = Callable[[PullProgress], None]


@dataclass(frozen=True)
class PulledFile:
    """A file that is now in the cache and verified."""

    remote: RemoteFile
    path: Path
    size: int
    sha256: str | None          # None only when neither the catalog nor the Hub has one
    downloaded: int             # bytes transferred this time (0: it was already cached)
    resumed_from: int = 0       # bytes kept from an earlier, interrupted pull
    repaired: bool = False      # a damaged cached copy was deleted and fetched again


@dataclass(frozen=True)
class PullResult:
    files: tuple[PulledFile, ...]

    @property
    def downloaded(self) -> int:
        return sum(f.downloaded for f in self.files)


@dataclass(frozen=True)
class _Target:
    """A file to have in the cache, with what the Hub says it must be."""

    remote: RemoteFile
    size: int
    sha256: str | None


def pull(remotes: Sequence[RemoteFile], *, pull_ref: str,
         on_progress: PullCallback | None = None) -> PullResult:
    """Make every file present and verified in the Hugging Face cache. `pull_ref` is
    what the user would pass to `localsmall pull` (for messages)."""
    if hubcache.offline():
        return PullResult(tuple(_offline_file(r, pull_ref, on_progress) for r in remotes))
    repos = {r.repo: _repo_files(r.repo, pull_ref) for r in remotes}
    targets = [_target(r, repos[r.repo]) for r in remotes]
    present: dict[str, PulledFile] = {}
    missing: list[tuple[_Target, bool]] = []
    for target in targets:
        cached = hubcache.cached_file(target.remote)
        if cached is not None and _verify(cached, target, on_progress):
            present[target.remote.file] = PulledFile(target.remote, cached, target.size,
                                                     target.sha256, 0)
            continue
        repaired = cached is not None
        if repaired:
            hubcache.remove_file(target.remote)
        missing.append((target, repaired))
    check_disk([t for t, _ in missing])
    for target, repaired in missing:
        present[target.remote.file] = _download(target, pull_ref, on_progress, repaired)
    return PullResult(tuple(present[r.file] for r in remotes))


def pull_repo(repo: str, select: Callable[[list[str]], list[str]], *, pull_ref: str,
              on_progress: PullCallback | None = None) -> Path:
    """Pull the files of a whole repository that `select` picks from its file list
    (fnmatch patterns), verified and resumable like catalog files; returns the cache's
    snapshot folder that holds them."""
    files = _repo_files(repo, pull_ref)
    patterns = select(sorted(files))
    chosen = [name for name in sorted(files)
              if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    remotes = [RemoteFile(repo=repo, file=name, size=max(files[name][0], 1),
                          sha256=files[name][1]) for name in chosen]
    result = pull(remotes, pull_ref=pull_ref, on_progress=on_progress)
    first = result.files[0]
    return first.path.parents[len(Path(first.remote.file).parts) - 1]


def missing_bytes(remotes: Sequence[RemoteFile]) -> int:
    """Bytes still to download for these files (catalog sizes, minus partial pulls)."""
    total = 0
    for remote in remotes:
        if hubcache.cached_file(remote) is None:
            total += max(remote.size - _partial_bytes(remote), 0)
    return total


def _partial_bytes(remote: RemoteFile) -> int:
    return sum(p.size for p in hubcache.partial_downloads(remote.repo) if p.file == remote.file)


# --- what the Hub says --------------------------------------------------------------------


def _repo_files(repo: str, pull_ref: str) -> dict[str, tuple[int, str | None]]:
    """file -> (size, LFS sha256) for every file of the repository."""
    from huggingface_hub import HfApi

    with hub_errors(repo, None, pull_ref):
        info = HfApi(endpoint=hubcache.endpoint()).model_info(repo, revision=REVISION,
                                                              files_metadata=True)
    return {s.rfilename: (s.lfs.size if s.lfs else (s.size or 0),
                          s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or []}


def _target(remote: RemoteFile, files: dict[str, tuple[int, str | None]]) -> _Target:
    if remote.file not in files:
        raise HubError(f"{remote.repo} has no file {remote.file} any more; this version of "
                       "localsmall's catalog is out of date: update localsmall")
    size, hub_sha = files[remote.file]
    if remote.sha256 and hub_sha and remote.sha256 != hub_sha:
        raise VerificationError(
            f"{remote.file} on the Hub is not the file localsmall's catalog pins (sha256 "
            f"{hub_sha[:12]}… instead of {remote.sha256[:12]}…); it was replaced upstream: "
            "update localsmall before pulling it")
    return _Target(remote, size or remote.size, remote.sha256 or hub_sha)


# --- cache checks --------------------------------------------------------------------------


def _verify(path: Path, target: _Target, on_progress: PullCallback | None) -> bool:
    """Whether a cached file is the expected one (hashing it unless already recorded)."""
    if path.stat().st_size != target.size:
        return False
    if target.sha256 is None:
        return True
    if hubcache.verified_sha256(path) == target.sha256:
        return True
    sha = sha256_of(path, _reporter(on_progress, target.remote.file, "verify", target.size))
    if sha == target.sha256:
        hubcache.record_verified(path, sha)
    return sha == target.sha256


def _offline_file(remote: RemoteFile, pull_ref: str,
                  on_progress: PullCallback | None) -> PulledFile:
    """With HF_HUB_OFFLINE set: the cached copy, verified, or a clear error."""
    path = hubcache.cached_file(remote)
    if path is None:
        raise HubError(f"{remote.file} is not downloaded and HF_HUB_OFFLINE is set; unset "
                       f"HF_HUB_OFFLINE and run `localsmall pull {pull_ref}`")
    expected = remote.sha256 or hubcache.blob_sha256(path)
    target = _Target(remote, path.stat().st_size, expected)
    if not _verify(path, target, on_progress):
        hubcache.remove_file(remote)
        raise VerificationError(f"the cached {remote.file} was damaged (sha256 mismatch) and "
                                f"has been deleted; unset HF_HUB_OFFLINE and run "
                                f"`localsmall pull {pull_ref}`")
    return PulledFile(remote, path, target.size, expected, 0)


def check_disk(targets: Sequence[_Target]) -> None:
    """Refuse to start when the cache's disk cannot take what is left to download."""
    need = sum(max(t.size - _partial_size(t), 0) for t in targets)
    if not need:
        return
    free = hubcache.free_disk(hubcache.cache_dir())
    if need + DISK_HEADROOM > free:
        raise DiskSpaceError(
            f"not enough free disk space in {hubcache.cache_dir()}: the download needs "
            f"{gib_fixed(need + DISK_HEADROOM)} and {gib_fixed(free)} is free; free some space (or "
            "point HF_HUB_CACHE at a bigger disk) and try again")


def _partial_size(target: _Target) -> int:
    return _partial_bytes(target.remote)


# --- downloading ----------------------------------------------------------------------------


def _download(target: _Target, pull_ref: str, on_progress: PullCallback | None,
              repaired: bool) -> PulledFile:
    from filelock import FileLock, Timeout
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    remote = target.remote
    endpoint = hubcache.endpoint()
    url = hf_hub_url(remote.repo, remote.file, revision=REVISION, endpoint=endpoint)
    with hub_errors(remote.repo, remote.file, pull_ref):
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    if not meta.etag:
        raise HubError(f"{endpoint} did not describe {remote.file} (no ETag); is HF_ENDPOINT "
                       "a Hugging Face Hub?")
    # Every request goes through the resolve URL of this commit: the Hub's redirect to its
    # CDN is signed for a limited time, so a resumed pull asks for a fresh one (httpx
    # drops the token when a redirect leaves the Hub's host).
    data_url = hf_hub_url(remote.repo, remote.file, revision=meta.commit_hash or REVISION,
                          endpoint=endpoint)
    headers = build_hf_headers()
    hubcache.clean_orphans(remote.repo)
    partial = hubcache.partial_path(remote.repo, meta.etag)
    blob = partial.with_name(meta.etag)
    lock_file = hubcache.lock_path(remote.repo, meta.etag)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock_file), timeout=LOCK_WAIT_S):
            kept = partial.stat().st_size if partial.exists() else 0
            hubcache.note_partial(partial, remote.file, target.size)
            with hub_errors(remote.repo, remote.file, pull_ref):
                sha = fetch(data_url, partial, size=target.size, headers=headers,
                            on_position=_reporter(on_progress, remote.file, "download",
                                                  target.size))
            if target.sha256 is not None and sha != target.sha256:
                hubcache.remove_partial(partial)
                raise VerificationError(
                    f"{remote.file} arrived damaged (sha256 {sha[:12]}… instead of "
                    f"{target.sha256[:12]}…) and was deleted; run `localsmall pull "
                    f"{pull_ref}` to download it again")
            os.replace(partial, blob)
            hubcache.remove_partial(partial)  # its note
    except Timeout:
        raise HubError(f"another localsmall or huggingface_hub process is downloading "
                       f"{remote.file}; wait for it to finish") from None
    with hub_errors(remote.repo, remote.file, pull_ref):
        path = Path(hf_hub_download(remote.repo, remote.file, revision=REVISION,
                                    cache_dir=hubcache.cache_dir(), endpoint=endpoint))
    if Path(os.path.realpath(path)) != Path(os.path.realpath(blob)):
        # The Hub moved on between our calls: check what huggingface_hub fetched too.
        check = _Target(remote, target.size, target.sha256)
        if not _verify(path, check, on_progress):
            hubcache.remove_file(remote)
            raise VerificationError(f"{remote.file} changed on the Hub during the pull; run "
                                    f"`localsmall pull {pull_ref}` again")
    hubcache.record_verified(path, sha)
    return PulledFile(remote, path, target.size, target.sha256, target.size - kept,
                      resumed_from=kept, repaired=repaired)


def _reporter(on_progress: PullCallback | None, file: str,
              stage: Literal["verify", "download"], total: int) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    return lambda done: on_progress(PullProgress(file, stage, done, total))


# --- errors --------------------------------------------------------------------------------


@contextlib.contextmanager
def hub_errors(repo: str, file: str | None, pull_ref: str) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into messages saying what to do."""
    import httpx2
    from huggingface_hub import errors

    endpoint = hubcache.endpoint()
    what = f"{file} from {repo}" if file else repo
    again = f"run `localsmall pull {pull_ref}` again"
    try:
        yield
    except errors.GatedRepoError:
        raise HubError(f"{repo} is gated: accept its licence at {endpoint}/{repo} while "
                       "logged in, then set HF_TOKEN to a token of that account") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{repo} was not found on {endpoint}; if it is private, set HF_TOKEN "
                       "to a token that can read it") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo} has no revision {REVISION!r} on {endpoint}") from None
    except errors.RemoteEntryNotFoundError:
        raise HubError(f"{repo} has no file {file}; localsmall's catalog may be out of date: "
                       "update localsmall") from None
    except errors.OfflineModeIsEnabled:
        raise HubError(f"HF_HUB_OFFLINE is set, so {what} cannot be downloaded; unset it and "
                       f"{again}") from None
    except errors.LocalEntryNotFoundError:
        raise HubError(f"could not reach {endpoint} to get {what} (no network, or the Hub is "
                       f"not answering); check the connection and {again}") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise HubError(_http_message(status, what, endpoint, again)) from None
    except httpx2.TransportError as exc:
        raise HubError(f"the connection to {endpoint} failed while getting {what} ({exc}); "
                       f"{again} (downloaded bytes are kept)") from None


def _http_message(status: int, what: str, endpoint: str, again: str) -> str:
    if status == 401:
        return (f"{endpoint} refused {what} (401 unauthorized): HF_TOKEN is missing or not "
                "valid; set it to a token that can read the repository")
    if status == 403:
        return (f"{endpoint} refused {what} (403 forbidden): the token in HF_TOKEN may not "
                "read this repository (gated? accept its licence first)")
    if status == 404:
        return f"{endpoint} has no {what} (404)"
    if status >= 500:
        return f"{endpoint} failed ({status}) while sending {what}; {again} later"
    return f"{endpoint} answered {status} for {what}; {again}"
