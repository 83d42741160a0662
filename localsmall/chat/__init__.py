"""Chatting with a loaded engine: the session, its slash commands, the conversation
(saved to and loaded from disk) and the prompt built from it.

Rule: prints nothing (results come back as values for `ui/`). May import the base layer
and `engine`; never `runtime`, `commands` or `ui`.
"""
