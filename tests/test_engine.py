"""The engine on the real llama.cpp: loading, streaming, images, the KV prefix cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, ImageSlot, SamplingSettings, TokenRun
from localsmall.errors import ContextFullError, ModelLoadError, ModelNotFoundError
from localsmall.images import prepare_image_bytes
from tests.tinymodels import image_bytes

GREEDY = SamplingSettings(temperature=0, max_tokens=12)


def _prompt(engine: Engine, text: str) -> list:
    return [TokenRun(tuple(engine.tokenize(f"<s>[INST]{text}[/INST]", special=True)))]


def test_streams_tokens_and_reports_stats(engine: Engine) -> None:
    prompt = _prompt(engine, "Hello there")
    n_prompt = len(prompt[0].ids)
    generation = engine.generate(prompt, GREEDY)
    events = []
    for event in generation:
        events.append(event)
        # Each token is handed over as soon as it is sampled, before the next one is
        # computed: the cache holds the prompt and the tokens before this one.
        assert len(generation.result.token_ids) == len(events)
        assert engine.cached_positions == n_prompt + len(events) - 1
    result = generation.result
    assert len(events) == 12 == result.stats.generated_tokens
    assert "".join(e.text for e in events) == result.text
    assert result.stats.stop_reason == "length"
    assert result.stats.prompt_tokens == n_prompt
    assert result.stats.time_to_first_token_s > 0
    assert result.stats.context_used == result.stats.prompt_tokens + 11


def test_greedy_is_deterministic(engine: Engine) -> None:
    engine.reset()
    first = engine.generate(_prompt(engine, "Tell me a story"), GREEDY).run()
    engine.reset()
    second = engine.generate(_prompt(engine, "Tell me a story"), GREEDY).run()
    assert first.token_ids == second.token_ids


def test_plain_greedy_picks_what_llama_cpps_greedy_sampler_picks(engine: Engine) -> None:
    """Plain greedy replies take the argmax of the logits directly (sampler.argmax_token);
    a zero logit bias sends the same reply through llama.cpp's sampler chain instead."""
    from dataclasses import replace

    from localsmall.engine.sampler import plain_greedy

    through_chain = replace(GREEDY, max_tokens=24, logit_bias=((0, 0.0),))
    assert plain_greedy(replace(GREEDY, max_tokens=24)) and not plain_greedy(through_chain)
    replies = []
    for sampling in (replace(GREEDY, max_tokens=24), through_chain):
        engine.reset()
        replies.append(engine.generate(_prompt(engine, "Count to ten"), sampling).run())
    assert replies[0].token_ids == replies[1].token_ids
    assert len(replies[0].token_ids) > 1


def test_quantized_model_runs_a_multi_token_prompt(tiny) -> None:
    # Batched decode of a K-quant model: the path that crashes on AMX CPUs unless the
    # engine keeps weights out of the AMX buffer.
    settings = EngineSettings(model_path=tiny.q4_k_m, n_ctx=1024, n_threads=2)
    with Engine(settings) as q4:
        prompt = _prompt(q4, "A longer prompt with many tokens " * 8)
        result = q4.generate(prompt, GREEDY).run()
    assert result.stats.evaluated_tokens > 50
    assert result.stats.generated_tokens == 12


def test_image_tokens_reach_the_model(engine: Engine) -> None:
    image = prepare_image_bytes(image_bytes(112, 84), "a.png")
    other = prepare_image_bytes(image_bytes(112, 84, seed=7), "b.png")
    def run(img):
        engine.reset()
        head = engine.tokenize("<s>[INST]", special=True)
        tail = engine.tokenize("What is this?[/INST]", special=True)
        prompt = [TokenRun(tuple(head)), ImageSlot(img), TokenRun(tuple(tail))]
        return engine.generate(prompt, GREEDY).run()
    a, b = run(image), run(other)
    # the fixture's engine starts with no remembered embeddings: each image is encoded
    assert a.stats.images_encoded == 1 and b.stats.images_encoded == 1
    again = run(image)  # the first image's embeddings are remembered
    assert again.stats.images_encoded == 0 and again.token_ids == a.token_ids
    assert a.stats.prompt_tokens == 2 + image.n_tokens + 1 + len(
        engine.tokenize("What is this?[/INST]", special=True))
    assert a.token_ids != b.token_ids  # the pixels change the answer


def test_prompt_larger_than_context_is_refused(tiny) -> None:
    settings = EngineSettings(model_path=tiny.f16, n_ctx=256, n_threads=2)
    with Engine(settings) as small, pytest.raises(ContextFullError, match="larger --ctx"):
        small.generate(_prompt(small, "word " * 400), GREEDY).run()


def test_missing_and_corrupt_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        Engine(EngineSettings(model_path=tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="could not load"):
        Engine(EngineSettings(model_path=bad))


def test_prompt_progress_moves_inside_batches(engine: Engine) -> None:
    engine.reset()
    seen: list[tuple[str, int, int]] = []
    prompt = _prompt(engine, "word " * 700)  # two batches of up to 512 tokens
    engine.generate(prompt, GREEDY, on_progress=lambda p: seen.append(
        (p.stage, p.done, p.total))).run()
    done = [d for stage, d, _ in seen if stage == "prompt"]
    total = seen[-1][2]
    assert done == sorted(done) and done[-1] == total == len(prompt[0].ids)
    # More updates than batches: the bar moves while llama.cpp computes a batch.
    assert len(set(done)) > 4
    assert any(0 < d < 512 for d in done)


def test_image_encoding_reports_per_layer_progress(engine: Engine) -> None:
    engine.reset()
    assert engine.projector is not None
    engine.projector.forget()
    image = prepare_image_bytes(image_bytes(224, 168, seed=11), "p.png")
    seen: list = []
    head = TokenRun(tuple(engine.tokenize("<s>[INST]", special=True)))
    tail = TokenRun(tuple(engine.tokenize("Hi[/INST]", special=True)))
    engine.generate([head, ImageSlot(image), tail], GREEDY, on_progress=seen.append).run()
    layers = [(p.done, p.total) for p in seen if p.stage == "image"]
    assert layers[0] == (1, 2) and layers[-1] == (2, 2)  # the tiny tower has 2 layers


def test_ctrl_c_while_loading_stops_cleanly(tiny, engine: Engine) -> None:
    calls: list[int] = []

    def interrupt(progress) -> None:
        calls.append(progress.done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Engine(EngineSettings(model_path=tiny.f16, n_ctx=512), on_progress=interrupt)
    assert calls == [calls[0]] and calls[0] < 1000  # stopped at the first report
    # llama.cpp is left in a usable state: the engine loaded before still answers
    after = engine.generate(_prompt(engine, "Still there?"), GREEDY).run()
    assert after.stats.generated_tokens == 12


def _fake_cpu(extra_buffer_types: tuple[str, ...]) -> list:
    from localsmall.engine.devices import BackendDevice

    return [BackendDevice(index=0, name="CPU", description="a test CPU", kind="cpu",
                          backend="CPU", memory_free=1 << 34, memory_total=1 << 35,
                          extra_buffer_types=extra_buffer_types, features=())]


@pytest.mark.parametrize(("extra", "amx"), [(("AMX", "CPU_REPACK"), True),
                                            (("CPU_REPACK",), False)])
def test_amx_cpus_keep_quantized_weights_in_plain_buffers(tiny, monkeypatch, extra, amx
                                                          ) -> None:
    # llama.cpp's AMX buffer crashes on batched decode (llama.cpp #20824): a CPU whose
    # extra buffer types include AMX must load with them off.
    from localsmall.engine import devices

    monkeypatch.setattr(devices, "list_devices", lambda: _fake_cpu(extra))
    monkeypatch.delenv("LOCALSMALL_WEIGHT_REPACK", raising=False)
    assert devices.cpu_has_amx_repack() is amx
    with Engine(EngineSettings(model_path=tiny.q4_k_m, n_ctx=256, n_threads=2)) as q4:
        weights = {b.buffer for b in q4.buffers if b.kind == "model"}
        note = q4.repack_note
    assert weights, "llama.cpp reported no model buffer"
    if amx:
        assert note == "repacking off (AMX CPU)"
        # every weight in a plain CPU buffer: none in AMX or repacked buffers
        assert weights <= {"CPU", "CPU_Mapped"}, weights
    else:
        assert note == ""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


def test_the_real_amx_decision_matches_this_cpu() -> None:
    from localsmall.engine.devices import cpu_has_amx_repack, list_devices

    decision = cpu_has_amx_repack()
    cpu = next(d for d in list_devices() if d.kind == "cpu")
    built_with_amx = any(name.startswith("AMX") and value not in ("", "0")
                         for name, value in cpu.features)
    flags = _cpu_flags()
    if Path("/proc/cpuinfo").exists():
        has_amx = {"amx_tile", "amx_int8"} <= flags
        # AMX buffers only on an AMX CPU, and always on one when llama.cpp has AMX
        assert not decision or has_amx
        assert decision or not (has_amx and built_with_amx)


def test_img_break_rows_are_written_from_the_projector_file(engine: Engine) -> None:
    # llama.cpp builds these rows from uninitialised memory scaled by zero; NaN or inf
    # left there by an earlier graph must not reach the KV cache.
    import numpy as np

    assert engine.projector is not None
    image = prepare_image_bytes(image_bytes(112, 84), "grid.png")  # 4 x 3 patches
    cols, rows = image.grid
    poisoned = np.ones((image.n_tokens, engine.info.n_embd), dtype=np.float32)
    breaks = [(r + 1) * (cols + 1) - 1 for r in range(rows - 1)]
    poisoned[breaks] = np.nan
    engine.projector._write_breaks(poisoned, image)
    assert np.isfinite(poisoned).all()
    from tests import tinymodels as tm

    expected = tm.text_tensors(tm.TINY_TEXT)["token_embd.weight"][12]
    for index in breaks:
        np.testing.assert_array_equal(poisoned[index], expected)
    assert (np.delete(poisoned, breaks, axis=0) == 1).all()  # other rows untouched


@pytest.mark.parametrize(("size", "budget"), [((1024, 768), 100), ((504, 504), 64),
                                              ((1024, 768), 400), ((300, 2000), 50)])
def test_an_image_budget_bounds_the_engines_own_count(engine: Engine, size, budget) -> None:
    """The budget is kept by the count that matters: what llama.cpp's mtmd makes of it."""
    assert engine.projector is not None
    image = prepare_image_bytes(image_bytes(*size, seed=5), "budget.png", max_tokens=budget)
    encoded = engine.projector.encode(image)
    assert encoded.n_tokens == image.n_tokens <= budget
    assert image.full_tokens > budget
