"""What localsmall adds on top of llama.cpp: time to first token and generation speed of a
`localsmall run`-style answer (ChatSession -> Engine) against llama-cpp-python's own
high-level `Llama` on the same file, prompt tokens and settings, in the same process.

Target: localsmall adds under 2% and under 20 ms. Runs alternate between the two so
machine noise hits both alike; medians are reported.

    .venv/bin/python benchmarks/run_overhead.py [--quant Q4_K_M] [--runs 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from placement import Placement, reference_placement
from synthetic import medium_model, timed_answer

from localsmall.chat.conversation import Message
from localsmall.chat.session import ChatSession
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings

N_CTX = 4096
THREADS = 2
PROMPT = "Explain, in a few paragraphs, how a refrigerator moves heat out of its box. " * 6


def _session(engine: Engine, tokens: int) -> ChatSession:
    return ChatSession(engine, system_prompt="You are concise.",
                       sampling=SamplingSettings(temperature=0, max_tokens=tokens))


def prompt_ids(engine: Engine) -> list[int]:
    """The exact token ids localsmall feeds for PROMPT (no images: all text)."""
    session = _session(engine, 1)
    session.conversation.messages.append(Message.user(PROMPT))
    return [i for i in engine.layout(session._prompt()) if isinstance(i, int)]


def run_localsmall(engine: Engine, tokens: int) -> tuple[float, float]:
    """(time to first token, generated tokens per second) of a one-shot answer."""
    engine.reset()
    first, stats = timed_answer(_session(engine, tokens), PROMPT)
    return first, stats.generation_tps


def reference_llama(model_path: Path, *, n_ctx: int = N_CTX, n_threads: int = THREADS,
                    placement: Placement | None = None) -> Any:
    """llama-cpp-python's `Llama` on `model_path`, its weights placed as localsmall places
    them on this CPU (`placement`, by default `reference_placement()`). `Llama` has no
    argument for that, so the model parameters are set as `Llama` creates them."""
    import llama_cpp

    repack = (placement or reference_placement()).repack

    class PlacedLlama(llama_cpp.Llama):  # type: ignore[misc]
        # Llama.__init__ assigns self.model_params = llama_model_default_params(), then
        # loads the model with that struct: the setter sets the placement in between.
        @property
        def model_params(self) -> Any:
            return self._placed_params

        @model_params.setter
        def model_params(self, params: Any) -> None:
            params.use_extra_bufts = repack
            self._placed_params = params

    return PlacedLlama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads,
                       n_threads_batch=n_threads, n_batch=512, verbose=False)


def run_llama_cpp_python(llm: object, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    llm.reset()  # type: ignore[attr-defined]
    start = time.perf_counter()
    first = 0.0
    count = 0
    stream = llm.create_completion(prompt=prompt_ids, max_tokens=tokens,  # type: ignore[attr-defined]
                                   temperature=0.0, top_k=1, stream=True)
    for _ in stream:
        count += 1
        if count == 1:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first, (count - 1) / (total - first) if total > first else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    model_path, _ = medium_model(args.quant)
    placement = reference_placement()
    print(f"model: {model_path.name}, {args.tokens} tokens per answer, {args.runs} runs each; "
          f"{placement.note}")
    engine = Engine(EngineSettings(model_path=model_path, n_ctx=N_CTX, n_threads=THREADS))
    llm = reference_llama(model_path, placement=placement)
    ours_ttft, ours_tps, theirs_ttft, theirs_tps = [], [], [], []
    ids = prompt_ids(engine)
    run_localsmall(engine, 4)  # warm-up both
    run_llama_cpp_python(llm, ids, 4)
    for _ in range(args.runs):
        ttft, tps = run_localsmall(engine, args.tokens)
        ours_ttft.append(ttft)
        ours_tps.append(tps)
        ttft, tps = run_llama_cpp_python(llm, ids, args.tokens)
        theirs_ttft.append(ttft)
        theirs_tps.append(tps)
    a, b = statistics.median(ours_ttft), statistics.median(theirs_ttft)
    c, d = statistics.median(ours_tps), statistics.median(theirs_tps)
    print(f"prompt: {len(ids)} tokens")
    print(f"time to first token: localsmall {a * 1000:.1f} ms, llama-cpp-python {b * 1000:.1f} ms"
          f" -> ratio {a / b:.3f} ({(a - b) * 1000:+.1f} ms)")
    print(f"generation: localsmall {c:.2f} tok/s, llama-cpp-python {d:.2f} tok/s"
          f" -> ratio {c / d:.3f} (localsmall {'faster' if c >= d else 'slower'})")
    engine.close()


if __name__ == "__main__":
    main()
