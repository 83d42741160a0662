"""Follow-up questions through the KV cache: a three-turn conversation with an image in
turn 1. For turns 2 and 3 it reports the time to first token through the cache against
(a) re-reading the whole conversation from an empty cache, as llama-cpp-python's
MTMDChatHandler does on every call, and (b) the time the turn's own new tokens take to
evaluate (llama.cpp's decode calls alone).

Target: a follow-up's time to first token within 10% of (b), whatever the history.

    .venv/bin/python benchmarks/kv_followup.py [--model tiny|medium] [--history 1500]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image
from synthetic import medium_model, timed_answer, tiny_model

from localsmall.chat.session import ChatSession
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings
from localsmall.images import prepare_image_bytes

REPLY_TOKENS = 24


def _picture() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (336, 448, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _full_reread(session: ChatSession) -> float:
    """Time to first token of the last turn from an empty cache (no cached embeddings)."""
    messages = session.conversation.messages
    last_reply = messages.pop()
    try:
        prompt = session._prompt()
        session.engine.reset()
        assert session.engine.projector is not None
        session.engine.projector.forget()
        start = time.perf_counter()
        generation = session.engine.generate(prompt, session.sampling)
        next(iter(generation))
        ttft = time.perf_counter() - start
        generation.close()
        return ttft
    finally:
        messages.append(last_reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--history", type=int, default=1500,
                        help="approximate tokens of text in turn 1 (the history length)")
    args = parser.parse_args()
    model, mmproj = tiny_model() if args.model == "tiny" else medium_model("Q4_K_M")
    engine = Engine(EngineSettings(model_path=model, mmproj_path=mmproj, n_ctx=8192,
                                   n_threads=2))
    session = ChatSession(engine, system_prompt="You describe images.",
                          sampling=SamplingSettings(temperature=0, max_tokens=REPLY_TOKENS))
    session.pending_images.append(prepare_image_bytes(_picture(), "picture.png"))
    history = "Here is some background for the picture. " * (args.history // 8)
    ttft1, stats1 = timed_answer(session, history + "What is in this picture?")
    # Both timings run on this engine, so they share its weight placement (on an AMX CPU,
    # no repacking: see placement.py).
    placed = engine.repack_note or "default weight placement"
    print(f"model {model.name} ({placed}); turn 1: {stats1.prompt_tokens} prompt tokens "
          f"(image {stats1.images_encoded}x encoded), first token {ttft1 * 1000:.0f} ms")
    for number, question in ((2, "Which colour dominates?"), (3, "And in the corners?")):
        ttft, stats = timed_answer(session, question)
        full = _full_reread(session)
        own = stats.prompt_eval_s
        # Put the cache back as the conversation left it, for the next turn.
        restore = session.engine.generate(session._prompt(), session.sampling)
        next(iter(restore))
        restore.close()
        print(f"turn {number}: {stats.evaluated_tokens} new of {stats.prompt_tokens} tokens "
              f"({stats.reused_tokens} reused, images encoded {stats.images_encoded}); "
              f"first token {ttft * 1000:.0f} ms via cache vs {full * 1000:.0f} ms re-reading "
              f"everything (x{full / ttft:.1f} faster); own tokens' evaluation "
              f"{own * 1000:.0f} ms -> ratio {ttft / own:.2f}")
    engine.close()


if __name__ == "__main__":
    main()
