"""The request queue and the one decode at a time.

Requests are put in a bounded queue; a single worker thread takes them in order, picks
each one's warm slot, evaluates its prompt and streams its tokens back to the event
loop. A full queue is refused at once (429 with Retry-After), as is anything after
shutdown began (503). A client that goes away cancels its job: a queued job is dropped,
a running one stops at the next token (or at the next graph node while its prompt is
read). On shutdown every waiting and running request ends with an error event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from localsmall.engine.progress_log import ProgressLog
from localsmall.engine.types import PromptPiece, SamplingSettings, TurnStats
from localsmall.errors import ContextFullError, EngineError
from localsmall.server.errors import ApiError, busy, internal, invalid
from localsmall.server.slots import SlotChoice, SlotPool
from localsmall.server.stops import StopMatcher
from localsmall.server.trace import Stamps, mark

if TYPE_CHECKING:
    from localsmall.engine.model import Engine
    from localsmall.server.prompting import ReplyMemory

RETRY_AFTER_S = 2
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


@dataclass(frozen=True)
class Delta:
    """Generated text that can be sent (may be empty: a token still held back)."""

    text: str
    token_id: int


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    stats: TurnStats
    text: str
    token_ids: tuple[int, ...]
    slot: SlotChoice | None
    cut: bool = False  # a stop string cut the text: it no longer matches the tokens


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Delta | Finished | Failed


@dataclass(frozen=True)
class RequestLog:
    """What the server did with a request, for the terminal (see ui/serve_view.py)."""

    id: str
    phase: Literal["started", "progress", "finished", "failed", "cancelled"]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    time_to_first_token_s: float = 0.0
    slot: int | None = None
    waiting: int = 0
    message: str = ""


@dataclass(eq=False)
class Job:
    """One request's generation. Events arrive on `events` in the event loop."""

    id: str
    prompt: list[PromptPiece]
    sampling: SamplingSettings
    loop: asyncio.AbstractEventLoop
    stops: tuple[str, ...] = ()
    remember_reply: bool = True
    spell_control: bool = False  # send control tokens as text ("[TOOL_CALLS]"): tools
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    trace: Stamps | None = None  # stage times (see trace.py)
    start_logged: bool = False
    # Set by the worker once it has taken the job and is about to evaluate it.
    picked: threading.Event = field(default_factory=threading.Event)

    def post(self, event: Event) -> None:
        # RuntimeError: the event loop is already closed, nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _shutting_down() -> ApiError:
    """What a request gets once the server began to stop (503, retry later)."""
    return busy(RETRY_AFTER_S, "the server is shutting down", status=503)


class Scheduler:
    """Runs jobs one at a time on a worker thread. `start()` it, `stop()` it."""

    def __init__(self, engine: Engine, *, replies: ReplyMemory, max_queue: int = 16,
                 on_log: Callable[[RequestLog], None] | None = None) -> None:
        self.engine = engine
        self.pool = SlotPool(engine)
        self.replies = replies
        self.max_queue = max_queue
        self.on_log = on_log
        # Steps shorter than this (most on a warm cache) stay out of the request log.
        self.progress_after_s = 1.0
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="localsmall-decode", daemon=True)

    # --- called from the event loop ----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job, or raise 429 (queue full) / 503 (shutting down). True when the
        worker is idle, so the job starts at once."""
        with self._cond:
            if self._stopping:
                raise _shutting_down()
            if len(self._queue) >= self.max_queue:
                raise busy(RETRY_AFTER_S, f"the server is busy ({len(self._queue)} requests "
                           "waiting); retry later")
            idle = not self._queue and self._running is None
            self._queue.append(job)
            self._cond.notify()
        return idle

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job, or stop it within a token."""
        job.cancelled.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
            elif self._running is job:
                self.engine.interrupt()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def begin_stop(self) -> None:
        """Refuse new jobs and end queued and running ones with an error (returns at
        once: safe in a signal handler)."""
        error = _shutting_down()
        with self._cond:
            self._stopping = True
            while self._queue:
                self._queue.popleft().post(Failed(error))
            if self._running is not None:
                self.engine.interrupt()
            self.engine.stop_ahead()  # a request may be waiting for the system prompt
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """`begin_stop`, then wait for the worker thread."""
        self.begin_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the worker thread --------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self._running = self._queue.popleft()
            return self._running

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            except BaseException as exc:  # the worker must survive anything a job does
                job.post(Failed(internal(f"generation failed: {exc}")))
            finally:
                with self._cond:
                    self._running = None

    def note(self, line: str) -> None:
        """A line about the server's own work (the system prompt's read) in the request
        log: a "progress" entry with no request id."""
        self._log(RequestLog("", "progress", message=line))

    def _log(self, entry: RequestLog) -> None:
        if self.on_log is not None:
            with contextlib.suppress(Exception):  # a display problem must not stop serving
                self.on_log(entry)

    def _log_start(self, job: Job, slot: SlotChoice) -> None:
        """The request's "started" line, once: written with its second token (or as a slow
        step is reported, or it ends), so that neither the line nor the terminal hold up
        the first token on its way to the client."""
        if not job.start_logged:
            job.start_logged = True
            self._log(RequestLog(job.id, "started", slot=slot.seq_id, waiting=self.waiting,
                                 cached_tokens=slot.reused_positions))

    def _run(self, job: Job) -> None:
        engine = self.engine
        mark(job.trace, "picked")
        slot: SlotChoice | None = None

        def log_progress(line: str) -> None:
            if slot is not None:
                self._log_start(job, slot)
            self._log(RequestLog(job.id, "progress", message=line))

        # Long steps (the system prompt's read waited for, an image encoded, a long
        # prompt read) show in the request log.
        progress = ProgressLog(log_progress, every_s=5.0, after_s=self.progress_after_s)
        try:
            items = engine.layout(job.prompt)
            self.pool.settle_warmup(items, progress)
            if self._stopping:  # stopped while it waited for the system prompt's read
                job.post(Failed(_shutting_down()))
                return
            reserve = min(job.sampling.max_tokens or 0, engine.n_ctx // 4)
            slot = self.pool.select(items, reserve=reserve)
        except EngineError as exc:
            job.post(Failed(invalid("messages", str(exc))))
            return
        mark(job.trace, "slot")
        job.picked.set()
        generation = engine.generate(job.prompt, job.sampling, progress)
        matcher = StopMatcher(job.stops)
        finish: FinishReason = "stop"
        sent: list[str] = []
        try:
            for event in generation:
                if job.cancelled.is_set() or self._stopping:
                    finish = "cancelled"
                    break
                mark(job.trace, "first_token")
                text = matcher.feed(event.piece if job.spell_control else event.text)
                sent.append(text)
                job.post(Delta(text, event.id))
                mark(job.trace, "first_posted")
                if len(sent) == 2:  # the first token is sent by now (see _log_start)
                    self._log_start(job, slot)
                if matcher.stopped:
                    break
            else:
                if generation.result.stats.stop_reason in ("length", "context"):
                    finish = "length"
        except KeyboardInterrupt:
            finish = "cancelled"
        except ContextFullError as exc:
            generation.close()
            self._log_start(job, slot)
            job.post(Failed(invalid("messages", str(exc), code="context_length_exceeded")))
            self._log(RequestLog(job.id, "failed", message=str(exc)))
            return
        except EngineError as exc:
            generation.close()
            self._log_start(job, slot)
            job.post(Failed(internal(str(exc))))
            self._log(RequestLog(job.id, "failed", message=str(exc)))
            return
        finally:
            generation.close()
            self._log_start(job, slot)  # before the end line, whatever the end
        self._finish(job, generation.result, finish, matcher, sent, slot)

    def _finish(self, job: Job, result: object, finish: FinishReason, matcher: StopMatcher,
                sent: list[str], slot: SlotChoice) -> None:
        from localsmall.engine.types import TurnResult

        assert isinstance(result, TurnResult)
        tail = matcher.flush()
        if tail:
            sent.append(tail)
            job.post(Delta(tail, -1))
        text = "".join(sent)
        stats = result.stats
        if finish == "cancelled":
            error = _shutting_down() if self._stopping else ApiError(
                499, "the request was cancelled", code="cancelled")
            job.post(Failed(error))
        else:
            if job.remember_reply and not matcher.stopped:
                self.replies.remember(text, tuple(result.token_ids))
            job.post(Finished(finish, stats, text, tuple(result.token_ids), slot,
                              cut=matcher.stopped))
        self._log(RequestLog(
            job.id, "cancelled" if finish == "cancelled" else "finished",
            prompt_tokens=stats.prompt_tokens, cached_tokens=stats.reused_tokens,
            completion_tokens=len(result.token_ids),
            seconds=time.perf_counter() - job.submitted_at,
            time_to_first_token_s=stats.time_to_first_token_s, slot=slot.seq_id,
            waiting=self.waiting))
