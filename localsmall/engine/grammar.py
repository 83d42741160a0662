"""Grammars for constrained replies: JSON (any object, or valid against a schema) and
Mistral tool calls, `[TOOL_CALLS]name[CALL_ID]id[ARGS]{arguments}`.

Pure text: the grammars name control tokens as `<[TOOL_CALLS]>` and the engine replaces
those with llama.cpp's token-id syntax (`<[9]>`), so a control token is matched as that
token and never as the characters "[TOOL_CALLS]" typed out of ordinary text pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from localsmall.engine.json_grammar import GrammarBuilder, SchemaError, literal
from localsmall.engine.types import Constraint

TOOL_CALLS, CALL_ID, ARGS = "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"
TOOL_TOKENS = (TOOL_CALLS, CALL_ID, ARGS)
ANY_OBJECT: dict[str, Any] = {"type": "object"}

__all__ = [
    "ANY_OBJECT",
    "TOOL_TOKENS",
    "SchemaError",
    "check_schema",
    "forbid_tool_calls",
    "json_constraint",
    "tool_call_constraint",
]


def _token(piece: str) -> str:
    return f"<{piece}>"


def check_schema(schema: Any) -> None:
    """Raise SchemaError if `schema` cannot be enforced."""
    GrammarBuilder().schema(schema, "check")


def json_constraint(schema: Any | None = None) -> Constraint:
    """A reply that is one JSON object (schema None) or JSON valid against `schema`."""
    builder = GrammarBuilder()
    root = builder.schema(ANY_OBJECT if schema is None else schema, "json")
    return Constraint(grammar=builder.text(root), allowed_control=())


def _calls_rule(builder: GrammarBuilder, tools: Sequence[tuple[str, Any | None]],
                parallel: bool) -> str:
    # The id is optional: the model may write [ARGS] right after the name (the parser
    # then makes an id up).
    call_id = builder.add("call-id", f"{_token(CALL_ID)} [a-zA-Z0-9]{{9}}")
    alternatives = []
    for name, schema in tools:
        args = builder.schema(ANY_OBJECT if schema is None else schema, f"args-{name}")
        alternatives.append(f"{literal(name)} {call_id}? {_token(ARGS)} {args}")
    call = builder.add("call", f"{_token(TOOL_CALLS)} ( {' | '.join(alternatives)} )")
    return f"{call}+" if parallel else call


def tool_call_constraint(tools: Sequence[tuple[str, Any | None]], *, parallel: bool = True,
                         lazy: bool = False, or_json: Any | None = None) -> Constraint:
    """Calls to `tools` ((name, parameters schema or None for any object) pairs), one or
    (parallel) several. `lazy`: free text until the model writes [TOOL_CALLS], then a
    well-formed call. `or_json`: instead of calls, the reply may be JSON valid against
    that schema (tool_choice auto with a response format)."""
    if not tools:
        raise SchemaError("tool calls need at least one tool")
    builder = GrammarBuilder()
    calls = _calls_rule(builder, tools, parallel)
    root = calls
    if or_json is not None:
        root = f"{calls} | {builder.schema(or_json, 'json')}"
        lazy = False
    return Constraint(grammar=builder.text(root), lazy=lazy,
                      triggers=(TOOL_CALLS,) if lazy else (), allowed_control=TOOL_TOKENS)


def forbid_tool_calls() -> Constraint:
    """Free text, but no [TOOL_CALLS] (nor any other control token)."""
    return Constraint(allowed_control=())
