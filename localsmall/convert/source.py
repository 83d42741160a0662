"""Where a checkpoint comes from: a local directory, or a Hugging Face repository.

For a repository only the files one layout needs are downloaded (the official Mistral
Small 3.2 repository holds both layouts, ~48 GB each), through localsmall's hub code:
verified against the Hub's sha256 and resumable across runs, like `localsmall pull`.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localsmall.errors import ConversionError, HubError

if TYPE_CHECKING:
    from localsmall.hub.pull import PullCallback

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+$")

# Files to fetch for each layout, in order of preference (see layouts.LAYOUTS).
LAYOUT_FILES: dict[str, tuple[str, ...]] = {
    "mistral": ("params.json", "consolidated*.safetensors", "tekken.json", "README.md"),
    "transformers": ("config.json", "model*.safetensors", "model.safetensors.index.json",
                     "tekken.json", "preprocessor_config.json", "README.md"),
}


@dataclass(frozen=True)
class Source:
    """A checkpoint directory and, when known, the repository it came from."""

    directory: Path
    repo_id: str | None

    @property
    def base_name(self) -> str:
        """What output files are named after: the repository's name, or the directory's
        (e.g. Mistral-Small-3.2-24B-Instruct-2506)."""
        if self.repo_id:
            return self.repo_id.rsplit("/", 1)[-1]
        return self.directory.resolve().name


def download_patterns(repo_files: list[str]) -> list[str]:
    """The allow-patterns that fetch one complete layout out of a repository's files."""
    for patterns in LAYOUT_FILES.values():
        marker, weights = patterns[0], patterns[1]
        if marker in repo_files and any(fnmatch.fnmatch(f, weights) for f in repo_files):
            return list(patterns)
    raise ConversionError("the repository holds neither a transformers checkpoint "
                          "(config.json + model*.safetensors) nor a Mistral one "
                          "(params.json + consolidated.safetensors)")


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.is_offline_mode() or flag in ("1", "true", "yes", "on")


def download_checkpoint(repo_id: str, on_progress: PullCallback | None = None) -> Path:
    """Download one checkpoint layout of a Hub repository through localsmall's hub code
    (verified, resumable). Offline (HF_HUB_OFFLINE), it must already be in the cache."""
    if _offline():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except LocalEntryNotFoundError:
            raise HubError(f"{repo_id} is not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE is set; unset it to download, or give a local "
                           "directory") from None
    from localsmall.hub.pull import pull_repo

    return pull_repo(repo_id, download_patterns, pull_ref=repo_id, on_progress=on_progress)


def resolve_source(source: str, on_download: PullCallback | None = None) -> Source:
    """A local directory as is; a repo id (org/name) downloaded first."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{source} is a file; give the checkpoint's directory")
        match = _CACHE_SNAPSHOT.search(path.resolve().as_posix())
        repo = f"{match.group('org')}/{match.group('name')}" if match else None
        return Source(path, repo)
    if REPO_ID.match(source):
        return Source(download_checkpoint(source, on_download), source)
    raise ConversionError(f"{source} is neither a directory nor a Hugging Face repo id "
                          "(org/name)")


def readme_license(directory: Path) -> str | None:
    """The `license:` of a model card's front matter, if any."""
    readme = directory / "README.md"
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")[:8192]
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    match = re.search(r"^license:\s*['\"]?([\w.+-]+)", front, re.MULTILINE)
    return match.group(1) if match else None
