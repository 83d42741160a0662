"""Where localsmall keeps the user's files (platformdirs), in one place."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "localsmall"


def data_dir() -> Path:
    """Per-user data: converted models, saved chats. Override with LOCALSMALL_HOME."""
    override = os.environ.get("LOCALSMALL_HOME")
    if override:
        return Path(override) / "data"
    return Path(platformdirs.user_data_dir(APP_NAME))


def state_dir() -> Path:
    """Per-user state: input history, registered local builds."""
    override = os.environ.get("LOCALSMALL_HOME")
    if override:
        return Path(override) / "state"
    return Path(platformdirs.user_state_dir(APP_NAME))


def cache_dir() -> Path:
    """Per-user cache: data localsmall can recompute (benchmark reference log-probs)."""
    override = os.environ.get("LOCALSMALL_HOME")
    if override:
        return Path(override) / "cache"
    return Path(platformdirs.user_cache_dir(APP_NAME))


def history_file() -> Path:
    """The chat prompt's input history, shared across sessions."""
    return state_dir() / "chat_history"


def last_chat_file() -> Path:
    """The chat saved after each turn, which `localsmall chat --resume` continues."""
    return state_dir() / "last_chat.json"
