"""Ctrl-C at any moment of a chat turn, through the real engine: a real SIGINT, sent while
llama.cpp reads the prompt, encodes an image, before the first token and while the reply
streams (from a timer at random offsets, and from inside llama.cpp's own callbacks, where
a KeyboardInterrupt used to be swallowed). Every time the turn must stop, the chat must
keep its history, and the next turn must work.

No assertion depends on the machine's speed: replies have no length limit, so a reply
that ignored Ctrl-C would run on until the context is full, and the check is what
happened to the turn, not how long it took. Speed only changes which moments the random
offsets hit; deterministic trials (from the callbacks and after the k-th token) cover
each phase whatever the speed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from localsmall import interrupt
from localsmall.chat.results import Reply
from localsmall.chat.session import ChatSession
from localsmall.engine.model import Engine
from localsmall.engine.types import Progress, SamplingSettings

UNLIMITED = SamplingSettings(temperature=0, max_tokens=None)  # ends only when interrupted
SHORT = SamplingSettings(temperature=0, max_tokens=2)
TIME_BUDGET_S = 30.0      # random trials stop after this, once the minimum has run
MIN_TRIALS, MAX_TRIALS = 20, 60
TURN_WATCHDOG_S = 120.0   # a turn still running after this ignored Ctrl-C

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
         "seven", "wizards", "quietly", "judge", "boxing", "matches", "near", "harbour")


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@dataclass
class Outcome:
    kind: str                  # "before the answer", "interrupted", or a normal stop reason
    reply: Reply
    tokens: int
    ended_at: float


def _turn(session: ChatSession, text: str, *, sampling: SamplingSettings,
          images: tuple[Path, ...] = (), after_token: Callable[[int], None] | None = None,
          on_progress: Callable[[Progress], None] | None = None) -> Outcome:
    """One turn as the chat screen runs it (SIGINT only sets the interrupt flag), with
    progress reported to `on_progress` as the screen's bar is."""
    session.sampling = sampling
    for image in images:
        session.attach(str(image))
    reply = session.handle(text)
    assert isinstance(reply, Reply)
    count = 0
    deadline = time.monotonic() + TURN_WATCHDOG_S
    try:
        for _ in reply.stream(on_progress):
            count += 1
            if after_token is not None:
                after_token(count)
            assert time.monotonic() < deadline, "the reply ran on after Ctrl-C"
    except KeyboardInterrupt:  # while the prompt was read or an image encoded
        return Outcome("before the answer", reply, count, time.perf_counter())
    stop = reply.stats.stop_reason
    if stop == "interrupted" and not count:  # after the prompt, before the first token
        return Outcome("before the answer", reply, count, time.perf_counter())
    return Outcome(stop, reply, count, time.perf_counter())


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))


def _check(session: ChatSession, outcome: Outcome, before: list[Any], text: str,
           images: tuple[Path, ...], fired_at: float | None) -> None:
    messages = session.conversation.messages
    if outcome.kind == "before the answer":
        assert messages == before, "an unanswered message stayed in the chat"
        assert session.restored_input == text.strip()
        assert len(session.pending_images) == len(images)
    elif outcome.kind == "interrupted":
        assert messages[:-2] == before
        user, answer = messages[-2:]
        assert user.role == "user" and user.text == text.strip()
        assert len(user.images) == len(images)
        assert answer.role == "assistant" and answer.interrupted
        assert len(answer.token_ids or ()) == outcome.tokens
    else:
        # A reply may end on its own (end of sequence) only if Ctrl-C came after it.
        assert fired_at is None, f"Ctrl-C was lost: the reply went on to {outcome.kind!r}"
        assert messages[:-2] == before
    # Whatever happened, the turn is over and the chat is ready for the next one.
    session.pending_images.clear()
    session.restored_input = ""


def _next_turn_works(session: ChatSession) -> None:
    count = len(session.conversation.messages)
    outcome = _turn(session, "and next?", sampling=SHORT)
    assert outcome.kind == "length" and outcome.tokens == 2
    assert len(session.conversation.messages) == count + 2


@pytest.fixture
def session(engine: Engine) -> ChatSession:
    engine.reset()
    interrupt.clear()
    return ChatSession(engine, system_prompt="You are a test.", sampling=SHORT)


def test_ctrl_c_at_random_moments(session: ChatSession, make_image) -> None:
    rng = random.Random(11)
    # How long a turn takes here, to spread the random offsets over its phases.
    picture = make_image("calibrate.png", 224, 168, seed=99)
    start = time.perf_counter()
    _turn(session, _text(rng), sampling=SamplingSettings(temperature=0, max_tokens=4),
          images=(picture,))
    span = max(time.perf_counter() - start, 0.05) * 1.5
    session.clear()

    kinds: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    trial = 0
    while trial < MAX_TRIALS and (trial < MIN_TRIALS
                                  or time.monotonic() - started < TIME_BUDGET_S):
        trial += 1
        kind = ("timer", "progress", "token")[trial % 3]
        text = _text(rng)
        images = ((make_image(f"t{trial}.png", 224, 168, seed=trial),) if rng.random() < .5
                  else ())
        before = list(session.conversation.messages)
        fired: list[float] = []

        def fire(*, from_main: bool, fired: list[float] = fired) -> None:
            fired.append(time.perf_counter())
            if from_main:
                signal.raise_signal(signal.SIGINT)  # handled before this returns
            else:
                _sigint()

        # Every turn is bounded: Ctrl-C after the k-th token if nothing came before.
        stop_at = rng.randint(1, 12) if kind == "token" else 40

        def after_token(count: int, stop_at: int = stop_at,
                        fired: list[float] = fired) -> None:
            if count == stop_at and not fired:
                fire(from_main=True)

        timer = None
        progress_hook: Callable[[Progress], None] | None = None
        with interrupt.interrupting():
            if kind == "timer":
                timer = threading.Timer(rng.uniform(0, span), fire,
                                        kwargs={"from_main": False})
                timer.start()
            elif kind == "progress":
                # From inside llama.cpp's callbacks (abort callback while the prompt is
                # read, the projector's eval callback while an image is encoded).
                target = rng.randint(1, 6)
                seen = [0]

                def on_progress(event: Progress, target: int = target,
                                seen: list[int] = seen, fired: list[float] = fired) -> None:
                    if event.stage in ("prompt", "image") and not fired:
                        seen[0] += 1
                        if seen[0] >= target:
                            fire(from_main=True)

                progress_hook = on_progress
            try:
                outcome = _turn(session, text, sampling=UNLIMITED, images=images,
                                after_token=after_token,
                                on_progress=progress_hook)
            finally:
                if timer is not None:
                    timer.cancel()
                    timer.join()
            on_time = [t for t in fired if t < outcome.ended_at]
            if len(on_time) == len(fired):
                assert not interrupt.requested(), f"Ctrl-C was not acted upon ({kind}, {outcome})"
            interrupt.clear()  # a signal that came after the turn belongs to no turn
        _check(session, outcome, before, text, images, on_time[0] if on_time else None)
        if kind == "token":
            assert outcome.kind == "interrupted" and outcome.tokens == stop_at
        kinds[kind] = kinds.get(kind, 0) + 1
        outcomes[outcome.kind] = outcomes.get(outcome.kind, 0) + 1
        _next_turn_works(session)
    print(f"{trial} trials: {kinds}, outcomes {outcomes}")
    assert trial >= MIN_TRIALS
    assert outcomes.get("before the answer") and outcomes.get("interrupted"), outcomes


def test_sigint_inside_a_callback_is_never_swallowed(session: ChatSession) -> None:
    """The worst place for a SIGINT: inside llama.cpp's abort callback, with Python's own
    handler (no chat around it). The engine's native sections turn it into the flag."""
    calls = [0]

    def on_progress(event: Progress) -> None:
        calls[0] += 1
        if calls[0] == 1:
            signal.raise_signal(signal.SIGINT)

    session.sampling = UNLIMITED
    reply = session.handle(" ".join(WORDS * 20))
    assert isinstance(reply, Reply)
    with pytest.raises(KeyboardInterrupt):
        list(reply.stream(on_progress))
    assert calls[0] >= 1
    assert not interrupt.requested()
    assert session.conversation.messages == []
    session.restored_input = ""
    _next_turn_works(session)


def test_flag_outside_a_chat_stops_generation(session: ChatSession) -> None:
    """`interrupt.request()` (what the SIGINT handler does) stops a reply at its next
    token, from another thread too; the request is consumed."""
    session.sampling = UNLIMITED
    reply = session.handle("count to a thousand")
    assert isinstance(reply, Reply)
    count = 0
    for _ in reply:
        count += 1
        if count == 3:
            threading.Thread(target=interrupt.request).start()
            time.sleep(0.05)
    assert reply.stats.stop_reason == "interrupted" and count <= 4
    assert not interrupt.requested()
    assert session.conversation.messages[-1].interrupted
