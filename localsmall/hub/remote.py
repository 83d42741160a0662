"""One file on the Hub: what the catalog lists and what the cache and a pull deal in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """One file of a published build on the Hub."""

    repo: str
    file: str
    size: int
    size_exact: bool = True
    sha256: str | None = None
