"""Driving a ChatSession in tests: one helper shared by the chat, KV cache and KV state tests."""

from __future__ import annotations

from localsmall.chat.session import ChatSession, Reply


def say(session: ChatSession, line: str) -> Reply:
    """Send `line` as a chat turn and stream the reply to its end."""
    reply = session.handle(line)
    assert isinstance(reply, Reply)
    for _ in reply:
        pass
    return reply
