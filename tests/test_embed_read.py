"""An image turn read in one llama_decode call: text as token embeddings beside the image's
(engine.embed_read), checked against llama.cpp's own token input and mtmd's helper."""

from __future__ import annotations

import numpy as np
import pytest

from localsmall.engine.embed_read import TokenEmbeddings, batch_count, fill_batch
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, ImageSlot, SamplingSettings, TokenRun
from localsmall.images import prepare_image_bytes
from tests.tinymodels import image_bytes

ONE = SamplingSettings(temperature=0, max_tokens=1)


def _last_logits(engine: Engine) -> np.ndarray:
    llama = engine._llama
    out = llama.llama_get_logits_ith(engine.ctx, -1)
    return np.ctypeslib.as_array(out, shape=(engine.n_vocab,)).copy()


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Logits equal up to what splitting a prompt into other batches changes anyway
    (measured on the tiny model: 0.03 on logits of magnitude 30)."""
    return bool(np.abs(a - b).max() < 0.01 * np.abs(b).max()) and a.argmax() == b.argmax()


def _image_prompt(engine: Engine, seed: int = 3) -> list:
    image = prepare_image_bytes(image_bytes(224, 168, seed=seed), "photo.png")
    head = engine.tokenize("<s>[INST]", special=True)
    tail = engine.tokenize("[IMG_END]What is in this picture?[/INST]", special=True)
    return [TokenRun(tuple(head)), ImageSlot(image), TokenRun(tuple(tail))]


@pytest.mark.parametrize("which", ["f16", "q4_k_m"])
def test_token_rows_are_what_llama_cpp_reads_for_the_tokens(tiny, which) -> None:
    # The same prompt given as token ids and as rows of the token table: same logits.
    path = getattr(tiny, which)
    with Engine(EngineSettings(model_path=path, n_ctx=512, n_threads=2)) as engine:
        tokens = engine.tokenize("<s>[INST]Describe a quiet lake at dawn.[/INST]",
                                 special=True)
        expected = engine.logits_for(tokens)
        rows = TokenEmbeddings.open(path, engine.info.n_embd)
        assert rows is not None
        engine.reset()
        llama = engine._llama
        batch = llama.llama_batch_init(len(tokens), engine.info.n_embd, 1)
        try:
            fill_batch(batch, rows.rows(tokens), 0, 0, logits_last=True)
            assert llama.llama_decode(engine.ctx, batch) == 0
        finally:
            llama.llama_batch_free(batch)
        got = _last_logits(engine)
        engine.reset()
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert got.argmax() == expected.argmax()


def test_token_rows_keep_order_and_repeats(engine: Engine, tiny) -> None:
    rows = TokenEmbeddings.open(tiny.f16, engine.info.n_embd)
    assert rows is not None
    table = rows.rows([5, 9, 5, 2])
    assert table.shape == (4, engine.info.n_embd) and table.dtype == np.float32
    assert np.array_equal(table[0], table[2]) and not np.array_equal(table[0], table[1])
    assert np.array_equal(rows.rows([9])[0], table[1])
    with pytest.raises(ValueError):
        rows.rows([rows.n_vocab])


def test_an_image_turn_is_one_decode_call_with_the_same_result(engine: Engine,
                                                               monkeypatch) -> None:
    prompt = _image_prompt(engine)
    together = engine.generate(prompt, ONE).run()
    logits = _last_logits(engine)
    positions = together.stats.prompt_tokens
    assert positions < engine.settings.n_batch
    # Text before, image and text after: one llama_decode call.
    assert together.stats.read_batches == 1
    assert together.stats.images_encoded == 1 and together.stats.evaluated_tokens == positions
    assert engine.cached_positions == positions

    # mtmd's helper, as before: three calls, same logits.
    engine.reset()
    monkeypatch.setattr(engine, "_token_rows", None)
    apart = engine.generate(prompt, ONE).run()
    assert apart.stats.read_batches == 3
    assert _close(_last_logits(engine), logits)
    assert apart.token_ids == together.token_ids


def test_a_small_batch_splits_the_turn_and_the_cache_follows(tiny, engine: Engine) -> None:
    prompt = _image_prompt(engine, seed=4)
    engine.generate(prompt, ONE).run()
    reference = _last_logits(engine)
    settings = EngineSettings(model_path=tiny.f16, mmproj_path=tiny.mmproj, n_ctx=1024,
                              n_threads=2, n_batch=16)
    with Engine(settings) as small:
        result = small.generate(prompt, ONE).run()
        n = result.stats.prompt_tokens
        assert result.stats.read_batches == batch_count(n, 16) > 2
        assert _close(_last_logits(small), reference)
        assert small.cached_positions == n
        # The next turn reuses the image from the cache and reads only its new text.
        more = small.tokenize("Fine.[INST]More?[/INST]", special=True)
        follow = [*prompt, TokenRun(tuple(more))]
        again = small.generate(follow, ONE).run()
        assert again.stats.reused_tokens >= n - 1 and again.stats.images_encoded == 0


def test_batch_count() -> None:
    assert [batch_count(n, 512) for n in (0, 1, 512, 513, 1100)] == [0, 1, 1, 2, 3]
