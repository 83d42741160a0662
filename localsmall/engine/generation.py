"""The token loop, a part of `Engine` (engine.model): a reply is evaluated (after any
background read), then sampled token by token until the end token, a length limit, a
full context or an interrupt; `Generation` is that reply, iterated for its tokens.
"""

from __future__ import annotations

import codecs
import time
import weakref
from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace

from localsmall import interrupt
from localsmall.engine.constrain import ConstrainedSampler
from localsmall.engine.parts import EngineParts
from localsmall.engine.sampler import argmax_token, plain_greedy, sampler_chain
from localsmall.engine.types import (
    ProgressCallback,
    PromptPiece,
    SamplingSettings,
    StopReason,
    TokenEvent,
    TurnResult,
)


class TokenGeneration(EngineParts):
    """Starting replies and running their token loop."""

    def generate(self, prompt: Sequence[PromptPiece], sampling: SamplingSettings,
                 on_progress: ProgressCallback | None = None) -> Generation:
        """Start a reply to `prompt`. Iterate the result for tokens; `.result` holds the
        text and stats so far (complete once iteration ends or the generation is closed).
        """
        generation = Generation(self, prompt, sampling, on_progress)
        self._live = weakref.ref(generation)
        return generation

    def _stream(self, prompt: Sequence[PromptPiece], sampling: SamplingSettings,
                on_progress: ProgressCallback | None,
                result: TurnResult) -> Generator[TokenEvent, None, None]:
        llama = self._llama
        turn_start = time.perf_counter()
        items = self.layout(prompt)
        self._check_workers()
        waited_s = self._await_ahead(on_progress)
        stats = replace(self._evaluate(items, prompt, on_progress), waited_s=waited_s)
        result.stats = stats
        sampler = sampler_chain(llama, self.tokenizer.n_tokens, sampling)
        constrained = None
        if sampling.constraint is not None:
            try:
                constrained = ConstrainedSampler(llama, self.vocab, sampler,
                                                 sampling.constraint, self.control_tokens)
            except BaseException:
                llama.llama_sampler_free(sampler)
                raise
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        greedy, n_vocab = plain_greedy(sampling), self.tokenizer.n_tokens
        stop: StopReason = ""
        first_token_at = 0.0
        gen_start = time.perf_counter()
        try:
            while True:
                if interrupt.take():  # Ctrl-C: the reply ends here, what came is kept
                    stop = "interrupted"
                    break
                token = (constrained.sample(self.ctx) if constrained is not None
                         else argmax_token(llama, self.ctx, n_vocab) if greedy
                         else llama.llama_sampler_sample(sampler, self.ctx, -1))
                if not result.token_ids:
                    first_token_at = time.perf_counter()
                    gen_start = first_token_at
                if self.tokenizer.is_end(token):
                    stop = "eos"
                    break
                text = decoder.decode(self.tokenizer.token_bytes(token))
                result.token_ids.append(token)
                result.text += text
                piece = self.tokenizer.token_piece(token) if self.tokenizer.is_control(token) \
                    else text
                yield TokenEvent(token, text, piece)
                if sampling.max_tokens is not None and len(result.token_ids) >= sampling.max_tokens:
                    stop = "length"
                    break
                if self.kv.n_past + 1 >= self.n_ctx:
                    stop = "context"
                    break
                try:
                    self._decode_tokens([token], logits_last=True)
                except KeyboardInterrupt:
                    stop = "interrupted"
                    if self._interrupted:
                        raise  # Engine.interrupt(): the caller (the server) sees it raised
                    break
        except (KeyboardInterrupt, GeneratorExit):
            stop = "interrupted"
            raise
        finally:
            tail = decoder.decode(b"", final=True)
            result.text += tail
            if constrained is not None:
                constrained.free()  # frees the chain too
            else:
                llama.llama_sampler_free(sampler)
            now = time.perf_counter()
            result.stats = replace(
                result.stats, generated_tokens=len(result.token_ids), stop_reason=stop,
                time_to_first_token_s=(first_token_at or now) - turn_start,
                generation_s=now - gen_start if result.token_ids else 0.0,
                context_used=self.kv.n_past, context_size=self.n_ctx)


class Generation:
    """A reply being generated: iterate for `TokenEvent`s; `.result` fills as it goes."""

    def __init__(self, engine: TokenGeneration, prompt: Sequence[PromptPiece],
                 sampling: SamplingSettings, on_progress: ProgressCallback | None) -> None:
        self.result = TurnResult()
        self._events = engine._stream(prompt, sampling, on_progress, self.result)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop generating (what was generated stays in the result and the cache)."""
        self._events.close()

    def run(self) -> TurnResult:
        """Generate to the end and return the result."""
        for _ in self._events:
            pass
        return self.result
