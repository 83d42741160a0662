"""Rendering untrusted chat templates (from GGUF metadata) with bounded time and size.

jinja2's sandbox stops a template from reaching Python internals, not from running for
minutes or filling memory: `range` loops nested three deep, `lipsum(10**6)`, `"x" * 10**9`
or `"x"|center(10**9)` are all legal. Here every bound is enforced:

- time: while a template renders, a trace function checks a deadline on every line the
  render executes (template code and the Python helpers it calls), so no loop outlives it;
- size: the output is collected chunk by chunk and stops at a bound; string and list
  repetition, powers and every integer argument of a call or filter are capped, so no
  single step can allocate more than the bound either.

Any failure (syntax, runtime, a bound) is a TemplateLimitError with a one-line reason.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import operator
import sys
import time
from collections.abc import Callable, Mapping
from functools import cache
from types import FrameType
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_SECONDS = 2.0         # a real chat template renders in milliseconds
MAX_OUTPUT_CHARS = 1 << 20     # beyond the messages' own text
MAX_INT_ARGUMENT = 100_000     # widths, counts and repeats a template may ask for
MAX_EXPONENT_BITS = 4096


class TemplateLimitError(Exception):
    """A template failed or broke a bound (the message is one line)."""


class _Timeout(BaseException):
    """Raised inside the render by the tracer; BaseException so that nothing the
    template runs can catch it."""


def _check_int_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and \
                abs(value) > MAX_INT_ARGUMENT:
            raise jinja2.TemplateError(f"the number {value} is too large for a chat template")


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


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with repetition, powers and call arguments bounded."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            return _bounded_multiply(left, right)
        if operator == "**":
            return _bounded_power(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any,
             **kwargs: Any) -> Any:
        _check_int_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context/... markers
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_int_args(args[1:], kwargs)
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
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError, TypeError) as exc:
        raise TemplateLimitError(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def render_bounded(template: jinja2.Template, variables: Mapping[str, Any], *,
                   max_chars: int = MAX_OUTPUT_CHARS,
                   seconds: float = TEMPLATE_SECONDS) -> str:
    """Render `template`, stopping it after `seconds` or `max_chars` of output."""
    deadline = time.monotonic() + seconds

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Timeout
        return tracer

    previous = sys.gettrace()
    chunks: list[str] = []
    total = 0
    sys.settrace(tracer)
    try:
        for chunk in template.generate(**variables):
            total += len(chunk)
            if total > max_chars:
                raise TemplateLimitError(f"its output passed {max_chars:,} characters")
            chunks.append(chunk)
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
    finally:
        sys.settrace(previous)
    return "".join(chunks)
