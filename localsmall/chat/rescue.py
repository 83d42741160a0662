"""Keeping a conversation when the process must end at once (an RPC worker lost
mid-reply makes llama.cpp abort): written to the state folder, to `/load` later."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from localsmall import paths
from localsmall.chat.conversation import save_conversation

if TYPE_CHECKING:
    from localsmall.chat.session import ChatSession


def rescue_conversation(session: ChatSession) -> str:
    """Save the session's conversation (without its KV cache) and say where."""
    if not session.conversation.messages:
        return ""
    path = paths.state_dir() / f"rescued-chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
    save_conversation(session.conversation, path)
    return (f"The conversation was saved to {path}: start `localsmall chat` again and type "
            f"`/load {path}`.")
