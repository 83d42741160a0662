"""Rendering untrusted chat templates (from GGUF metadata) with bounded time and size.

jinja2's sandbox stops a template from reaching Python internals, not from running for
minutes or filling memory: `range` loops nested three deep, `lipsum(10**6)`, `"x" * 10**9`
or `"x"|center(10**9)` are all legal. Here every bound is enforced:

- time: a watchdog thread raises an exception in a render that outlives its deadline,
  wherever its loops are (see deadline.py; a trace function checking the clock on
  every line made every render ~8x slower);
- size: the output is collected chunk by chunk and stops at a bound; string and list
  repetition and concatenation (`*`, `+`, `~`), powers, format widths and every
  integer argument of a call or filter are capped, so no single step can allocate more
  than the bound either.

Any failure (syntax, runtime, a bound) is a TemplateLimitError with a one-line reason.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import operator
import os
import re
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localsmall.chat.deadline import run_with_deadline

TEMPLATE_SECONDS = 2.0         # a real chat template renders in milliseconds
MAX_OUTPUT_CHARS = 1 << 20     # beyond the messages' own text
MAX_INT_ARGUMENT = 100_000     # widths, counts and repeats a template may ask for
MAX_EXPONENT_BITS = 4096


_JINJA_DIR = os.path.dirname(jinja2.__file__)


class TemplateLimitError(Exception):
    """A template failed or broke a bound (the message is one line)."""


class _Timeout(BaseException):
    """Raised inside the render by the watchdog; BaseException so that nothing the
    template runs can catch it."""


def _check_int_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and \
                abs(value) > MAX_INT_ARGUMENT:
            raise jinja2.TemplateError(f"the number {value} is too large for a chat template")


# A width or precision of a million or more, or one taken from the arguments, in
# %-formatting and in str.format fields.
_BIG_WIDTH = re.compile(r"%[-#0 +]*(\*|\d{7,}|\d*\.(\*|\d{7,}))|\{[^{}]*:[^{}]*(\d{7,}|\{)")


def _check_format(text: Any) -> None:
    if isinstance(text, str) and _BIG_WIDTH.search(text):
        raise jinja2.TemplateError("a format width in the chat template is too large")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 0


def _bounded_add(left: Any, right: Any) -> Any:
    if _size(left) + _size(right) > MAX_OUTPUT_CHARS:
        raise jinja2.TemplateError("a concatenation in the chat template is too large")
    return operator.add(left, right)


def _bounded_modulo(left: Any, right: Any) -> Any:
    _check_format(left)
    return operator.mod(left, right)


def _bounded_join(join: Callable[[Any], str]) -> Callable[[Any], str]:
    """jinja's `~` operator (str_join / markup_join), refusing results over the bound."""

    def bounded(seq: Any) -> str:
        parts = list(seq)
        if sum(len(str(p)) for p in parts) > MAX_OUTPUT_CHARS:
            raise jinja2.TemplateError("a concatenation in the chat template is too large")
        return join(parts)

    return bounded


def _bounded_multiply(left: Any, right: Any) -> Any:
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, str | bytes | list | tuple) and isinstance(count, int) and \
                len(seq) * count > MAX_OUTPUT_CHARS:
            raise jinja2.TemplateError("a repetition in the chat template is too large")
    return operator.mul(left, right)


def _bounded_power(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and \
            abs(left).bit_length() * abs(right) > MAX_EXPONENT_BITS:
        raise jinja2.TemplateError("a power in the chat template is too large")
    return operator.pow(left, right)


_BOUNDED_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": _bounded_multiply, "**": _bounded_power, "+": _bounded_add, "%": _bounded_modulo}


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with repetition, powers and call arguments bounded."""

    intercepted_binops = frozenset(_BOUNDED_BINOPS)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return _BOUNDED_BINOPS[operator](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any,
             **kwargs: Any) -> Any:
        _check_int_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)  # str.format / format_map, sandboxed
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context/... markers
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_int_args(args[1:], kwargs)
        if name == "format":
            _check_format(args[0])
        return function(*args, **kwargs)

    return bounded


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


@cache
def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in the bounded sandbox (TemplateLimitError if invalid)."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=["jinja2.ext.loopcontrols"])
    # mistral-common serialises with json.dumps(ensure_ascii=False): match it.
    env.filters["tojson"] = lambda value, **_: json.dumps(value, ensure_ascii=False)
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        template = env.from_string(source)
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError, TypeError) as exc:
        raise TemplateLimitError(_one_line(exc)) from None
    # `~` compiles to calls of these two helpers, looked up in the template's globals.
    namespace = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        namespace[name] = _bounded_join(namespace[name])
    return template


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def render_bounded(template: jinja2.Template, variables: Mapping[str, Any], *,
                   max_chars: int = MAX_OUTPUT_CHARS,
                   seconds: float = TEMPLATE_SECONDS) -> str:
    """Render `template`, stopping it after `seconds` or `max_chars` of output."""
    chunks: list[str] = []

    def produce() -> str:
        total = 0
        for chunk in template.generate(**variables):
            total += len(chunk)
            if total > max_chars:
                raise TemplateLimitError(f"its output passed {max_chars:,} characters")
            chunks.append(chunk)
        return "".join(chunks)

    try:
        return run_with_deadline(produce, seconds=seconds, exception=_Timeout)
    except _Timeout:
        raise TemplateLimitError(f"it ran for more than {seconds:g} seconds") from None
    except TemplateLimitError:
        raise
    except RecursionError:
        raise TemplateLimitError("it recursed too deep") from None
    except MemoryError:
        raise TemplateLimitError("it ran out of memory") from None
    except Exception as exc:  # a template can raise anything its sandbox lets it reach
        raise TemplateLimitError(_one_line(exc)) from None
