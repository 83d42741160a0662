"""The exception tree. Every message says what went wrong and what to do next.

Library code raises these; `localsmall.cli` turns them into one clean line on stderr
and a non-zero exit code (tracebacks only with LOCALSMALL_DEBUG=1).
"""

from __future__ import annotations

import os


def debug_enabled() -> bool:
    """LOCALSMALL_DEBUG=1: tracebacks instead of one-line errors."""
    return os.environ.get("LOCALSMALL_DEBUG", "") not in ("", "0")


class LocalsmallError(Exception):
    """Base class: a problem the user can act on. `str(err)` is the full message."""

    exit_code = 1


class UsageError(LocalsmallError):
    """Conflicting or invalid flags and arguments."""

    exit_code = 2


class SpeedTargetError(LocalsmallError):
    """No build that fits this machine reaches the speed asked for (--min-speed)."""


class CatalogError(LocalsmallError):
    """models.toml is malformed, or names a model or quant that does not exist."""


class ModelNotFoundError(LocalsmallError):
    """A model file is not on disk (not pulled yet, or a wrong path)."""


class ModelLoadError(LocalsmallError):
    """llama.cpp could not load a model or projector file."""


class EngineError(LocalsmallError):
    """llama.cpp failed while evaluating or generating."""


class ContextFullError(EngineError):
    """The prompt does not fit in the context window even after trimming."""


class ImageError(LocalsmallError):
    """An image could not be read: missing, not an image, truncated, too large."""


class ConversationFileError(LocalsmallError):
    """A saved conversation could not be read or written."""


class HubError(LocalsmallError):
    """A download from the Hugging Face Hub failed."""


class VerificationError(HubError):
    """A downloaded file does not match its expected size or sha256."""


class DiskSpaceError(LocalsmallError):
    """Not enough free disk space for a download or conversion."""


class ConversionError(LocalsmallError):
    """A checkpoint could not be converted to GGUF."""


class ToolsError(LocalsmallError):
    """Tool definitions, a tool choice, a response format or a JSON schema that cannot be
    used. `param` names the request field at fault (for an HTTP 400), when known."""

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
