"""Fuzzing chat templates from GGUF metadata (localsmall.chat.prompt and
localsmall.chat.template_sandbox): whatever a model's template does, rendering stops
within its time and output bounds, and any failure falls back to the built-in template
with a notice; the prompt is always built."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localsmall.chat.conversation import Message
from localsmall.chat.prompt import ChatTemplate, build_prompt
from localsmall.chat.template_sandbox import (
    TEMPLATE_SECONDS,
    TemplateLimitError,
    compile_template,
    render_bounded,
)
from localsmall.engine.types import TokenRun
from tests.fuzzing import fuzz_settings, only_own_errors

TARGET = "chat templates"
MESSAGES = [Message.system("Be brief."), Message.user("Hi"), Message.assistant("Hello"),
            Message.user("More")]
# A generous bound over TEMPLATE_SECONDS: rendering is stopped at the deadline, and a
# loaded machine may take a while to notice.
STOPS_WITHIN_S = TEMPLATE_SECONDS + 8


def _tokenize(text: str, special: bool) -> list[int]:
    return [ord(c) % 1000 for c in text]


def _prompt(source: str) -> tuple[ChatTemplate, list]:
    def build() -> tuple[ChatTemplate, list]:
        template = ChatTemplate(source)
        return template, build_prompt(template, MESSAGES, tokenize=_tokenize, bos="<s>",
                                      eos="</s>")

    start = time.perf_counter()
    result = only_own_errors(TARGET, build)
    assert time.perf_counter() - start < STOPS_WITHIN_S
    assert not isinstance(result, Exception), result  # a fallback, never an error
    template, pieces = result
    assert pieces and all(isinstance(p, TokenRun) for p in pieces)
    return template, pieces


NESTED_LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}"
                "{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}")  # 10^15
LONG_OUTPUT = "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}"
RUNAWAYS = [
    NESTED_LOOPS,
    LONG_OUTPUT,
    "{{ lipsum(10**6) }}",
    "{{ lipsum(1000000, false, 1000, 1000) }}",
    "{{ 'x' * 10**9 }}",
    "{{ ['x'] * 10**9 }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.center(10**9) }}",
    "{{ 'x'|indent(10**9) }}",
    "{{ 10 ** 10 ** 10 }}",
    "{{ '%1000000000s' % 'x' }}",
    "{{ '%*s' % (1000000000, 'x') }}",
    "{{ '{:1000000000}'.format('x') }}",
    "{{ '{:{}}'.format('x', 1000000000) }}",
    "{{ '%1000000000s'|format('x') }}",
    "{% set l = range(100000)|list %}{% for i in range(40) %}{% set l = l + l %}{% endfor %}",
    "{% set s = namespace(v='x') %}{% for i in range(60) %}{% set s.v = s.v ~ s.v %}"
    "{% endfor %}{{ s.v }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ raise_exception('no') }}",
    "{{ messages[99]['content'] }}",
    "{{ messages.__class__ }}",
    "{% for",
    "{{ '\ue00099\ue001' }}",
    "{{ messages[0]['content'] }}{{ messages[0]['content'] }}",
]


@pytest.mark.parametrize("source", RUNAWAYS)
def test_runaway_templates_stop_and_fall_back(source: str) -> None:
    template, _ = _prompt(source)
    notices = template.take_notices()
    if notices:
        assert template.is_builtin and "built-in" in notices[0]


def test_bounds_without_fallback() -> None:
    with pytest.raises(TemplateLimitError, match="seconds"):
        render_bounded(compile_template(NESTED_LOOPS), {}, seconds=0.5)
    with pytest.raises(TemplateLimitError, match="characters"):
        render_bounded(compile_template(LONG_OUTPUT), {}, max_chars=10_000)
    assert render_bounded(compile_template("{{ 'ab' * 3 }}{{ lipsum(1) | length > 0 }}"
                                           "{{ '%5s|%-3d' % ('x', 7) }}{{ '{:>4}'.format(1) }}"
                                           "{{ 'a' ~ 1 ~ 'b' }}{{ [1] + [2] }}"),
                          {}) == "abababTrue    x|7     1a1b[1, 2]"


PIECES = st.sampled_from([
    "{{ bos_token }}", "{{ eos_token }}", "[INST]", "{% for m in messages %}", "{% endfor %}",
    "{{ m['content'] }}", "{{ m.role }}", "{% if m.role == 'user' %}", "{% endif %}",
    "{% for i in range(", "100000", "10**6", ") %}", "{{ lipsum(", ")}}", "{{ 'x' * ",
    " }}", "|center(", "{{ raise_exception('x') }}", "{% set x = ", "{{ x }}", "{{",
    "}}", "{%", "%}", "loop.index", "namespace(", "|join", "|tojson", "[1,2]", "(",
    ")", "'", "\ue0000\ue001", "[IMG]", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ messages|length }}", "{{ strftime_now('%Y') }}", "**", "*", " ~ "])


@given(parts=st.lists(PIECES, max_size=12), text=st.text(max_size=20))
@fuzz_settings(max_examples=1500, deadline_ms=int(STOPS_WITHIN_S * 1000))
def test_generated_templates(parts: list[str], text: str) -> None:
    _prompt(text.join(parts[:1]) + "".join(parts[1:]))
