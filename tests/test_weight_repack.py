"""Quantized weights in llama.cpp's CPU_REPACK buffers with the AMX buffer unused
(LOCALSMALL_WEIGHT_REPACK=cpu_repack, and `auto` on AMX CPUs when measured worth it):
which matrices go there, that the engine picks the placement it should on a simulated
AMX CPU, and that a real quantized model computes the same logits as with plain buffers
for batches of every size, several sequences and an image.

Skipped where this llama.cpp build or CPU has no CPU_REPACK buffer type."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from localsmall.engine import devices, loading, native
from localsmall.engine.devices import BackendDevice, list_devices
from localsmall.engine.logits import output_rows
from localsmall.engine.model import Engine
from localsmall.engine.repack import repack_buffer_type, repack_overrides, repack_supports
from localsmall.engine.types import EngineSettings, ImageSlot, SamplingSettings, TokenRun
from localsmall.errors import EngineError
from localsmall.gguf_header import read_header
from localsmall.images import prepare_image_bytes
from localsmall.plan.memory import repack_types
from tests.tinymodels import image_bytes

pytestmark = pytest.mark.skipif(repack_buffer_type() is None,
                                reason="this llama.cpp build has no CPU_REPACK buffer type")

GREEDY = SamplingSettings(temperature=0, max_tokens=8)


def _cpu(*extra_bufts: str) -> list[BackendDevice]:
    """A simulated CPU device offering these extra buffer types."""
    return [BackendDevice(index=0, name="CPU", description="simulated Xeon", kind="cpu",
                          backend="CPU", memory_free=16 << 30, memory_total=32 << 30,
                          extra_buffer_types=extra_bufts,
                          features=(("AVX512", "1"), ("AMX_INT8", "1"), ("REPACK", "1")))]


def _weight_buffers(engine: Engine) -> set[str]:
    return {b.buffer for b in engine.buffers if b.kind == "model"}


def _engine(path, mode: str, monkeypatch: pytest.MonkeyPatch, **settings) -> Engine:
    monkeypatch.setenv("LOCALSMALL_WEIGHT_REPACK", mode)
    return Engine(EngineSettings(model_path=path, n_threads=2, **settings))


@pytest.fixture(scope="module")
def pair(tiny) -> Iterator[dict[str, Engine]]:
    """The tiny Q4_K_M model (Q4_K and Q6_K matrices) loaded with plain buffers and with
    CPU_REPACK, able to hold three sequences."""
    with pytest.MonkeyPatch.context() as mp:
        engines = {mode: _engine(tiny.q4_k_m, mode, mp, n_ctx=1024, n_seq=3)
                   for mode in ("off", "cpu_repack")}
    try:
        yield engines
    finally:
        for engine in engines.values():
            engine.close()


def test_only_matrices_cpu_repack_can_multiply_are_routed(tiny) -> None:
    overrides = repack_overrides(tiny.q4_k_m)
    assert overrides is not None
    tensors = {t.name: t for t in read_header(tiny.q4_k_m).tensors}
    routed = {tensors[name].type for name in overrides.tensors}
    # ggml's answer agrees with the types the planner expects this CPU to repack
    cpu = next(d for d in list_devices() if d.kind == "cpu")
    expected = repack_types(name for name, value in cpu.features if value not in ("0", ""))
    assert routed and routed <= expected
    assert "token_embd.weight" not in overrides.tensors  # looked up by row
    skipped = {t.name for t in tensors.values() if len(t.shape) == 2
               and t.name not in overrides.tensors and t.name != "token_embd.weight"}
    assert all(tensors[name].type not in expected for name in skipped)
    assert overrides.n_bytes == sum(tensors[name].n_bytes for name in overrides.tensors)


def test_ggml_refuses_shapes_and_types_it_cannot_repack() -> None:
    import gguf

    q4_k, f16 = int(gguf.GGMLQuantizationType.Q4_K), int(gguf.GGMLQuantizationType.F16)
    assert repack_supports(q4_k, 1024, 2816)
    assert not repack_supports(q4_k, 1024, 2812)  # rows not a multiple of 8
    assert not repack_supports(f16, 1024, 2816)


def test_weights_go_to_cpu_repack_and_never_to_amx(pair: dict[str, Engine]) -> None:
    assert _weight_buffers(pair["cpu_repack"]) >= {"CPU_REPACK"}
    assert not any("AMX" in b.upper() for b in _weight_buffers(pair["cpu_repack"]))
    assert not any("REPACK" in b.upper() or "AMX" in b.upper()
                   for b in _weight_buffers(pair["off"]))
    assert "CPU_REPACK" in pair["cpu_repack"].info.weight_buffers
    assert "AMX off" in pair["cpu_repack"].info.weight_buffers


def _decode(engine: Engine, runs: Sequence[tuple[int, Sequence[int]]], batch: int,
            every: int = 4) -> np.ndarray:
    """Logits of several sequences (seq id, tokens) decoded from an empty cache, the
    positions of all sequences interleaved into batches of `batch`: the rows of every
    `every`-th position in that order and of the last (the output head dominates a tiny
    model's time)."""
    llama, ctx = native.llama(), engine.ctx
    items = [(seq, pos, tok) for seq, tokens in runs for pos, tok in enumerate(tokens)]
    items.sort(key=lambda item: (item[1], item[0]))  # sequences interleaved
    wanted = [i % every == 0 or i == len(items) - 1 for i in range(len(items))]
    n_vocab = engine.n_vocab
    out = np.empty((sum(wanted), n_vocab), dtype=np.float32)
    llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
    handle = llama.llama_batch_init(batch, 0, 1)
    done = 0
    try:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            handle.n_tokens = len(chunk)
            for k, (seq, pos, tok) in enumerate(chunk):
                handle.token[k], handle.pos[k], handle.n_seq_id[k] = tok, pos, 1
                handle.seq_id[k][0], handle.logits[k] = seq, wanted[start + k]
            assert llama.llama_decode(ctx, handle) == 0
            n_out = sum(wanted[start:start + len(chunk)])
            if n_out:
                out[done:done + n_out] = output_rows(llama, ctx, n_out, n_vocab)
                done += n_out
    finally:
        llama.llama_batch_free(handle)
        llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
        engine.reset()
    return out


def _tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 131000, n)]


def _assert_close(repacked: np.ndarray, plain: np.ndarray, variation: np.ndarray) -> None:
    """The same greedy token (but for rare near-ties), and logits no further from the
    plain placement's than llama.cpp's own results move between batch sizes (`variation`: the same
    positions decoded with plain buffers in batches that take the other kernel path).
    Activations are quantized to 8 bits before each product, so a last-bit difference
    may round one value the other way; a random model's sharp logits then move by a few
    percent of their spread (measured here: mean 0.7%, max 9% between batches of 1 and
    32). The floors keep the check meaningful where both paths agree exactly; a wrong
    weight layout moves logits by about their whole spread."""
    greedy = plain.argmax(axis=1)
    flips = int(np.sum(repacked.argmax(axis=1) != greedy))  # near-ties may flip
    natural_flips = int(np.sum(variation.argmax(axis=1) != greedy))
    assert flips <= max(2 * natural_flips, len(greedy) // 20)
    spread = float(plain.std())
    diff, natural = np.abs(repacked - plain), np.abs(variation - plain)
    assert float(diff[0].max()) < 1e-3 * spread  # the first position: no history to differ
    assert float(diff.mean()) <= max(2 * float(natural.mean()), 0.02 * spread)
    assert float(diff.max()) <= max(2 * float(natural.max()), 0.2 * spread)


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 32, 512])
def test_batched_decodes_match_plain_buffers(pair: dict[str, Engine], batch: int) -> None:
    # odd lengths: a short last batch
    tokens = _tokens({1: 21, 512: 515}.get(batch, 45), seed=batch)
    repacked, plain = (_decode(pair[m], [(0, tokens)], batch) for m in ("cpu_repack", "off"))
    other = _decode(pair["off"], [(0, tokens)], 32 if batch < 32 else 1)
    _assert_close(repacked, plain, other)


def test_several_sequences_in_one_batch_match_plain_buffers(pair: dict[str, Engine]) -> None:
    runs = [(0, _tokens(33, 1)), (1, _tokens(17, 2)), (2, _tokens(50, 3))]
    repacked, plain = (_decode(pair[m], runs, 64) for m in ("cpu_repack", "off"))
    _assert_close(repacked, plain, _decode(pair["off"], runs, 1))


def test_generation_and_image_match_plain_buffers(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    image = prepare_image_bytes(image_bytes(112, 84), "a.png")
    answers = {}
    for mode in ("off", "cpu_repack"):
        with _engine(tiny.q4_k_m, mode, monkeypatch, mmproj_path=tiny.mmproj,
                     n_ctx=1024) as engine:
            head = engine.tokenize("<s>[INST]", special=True)
            tail = engine.tokenize("What is this?[/INST]", special=True)
            prompt = [TokenRun(tuple(head)), ImageSlot(image), TokenRun(tuple(tail))]
            with_image = engine.generate(prompt, GREEDY).run()
            engine.reset()
            text = engine.generate([TokenRun(tuple(head + tail * 20))], GREEDY).run()
            answers[mode] = (with_image.token_ids, text.token_ids)
            assert with_image.stats.images_encoded == 1
    assert answers["cpu_repack"] == answers["off"]


@pytest.mark.parametrize("adopted", [False, True], ids=["repack-off", "repack-adopted"])
@pytest.mark.parametrize("cpu", [_cpu("AMX", "CPU_REPACK"), _cpu("CPU_REPACK")],
                         ids=["amx", "plain"])
def test_auto_placement_on_a_simulated_cpu(tiny, monkeypatch: pytest.MonkeyPatch,
                                           cpu: list[BackendDevice], adopted: bool) -> None:
    """`auto`: llama.cpp's default without AMX; with AMX never the AMX buffer, and
    CPU_REPACK exactly when the engine adopts it (loading.REPACK_ON_AMX, both ways)."""
    monkeypatch.setattr(devices, "list_devices", lambda: cpu)
    monkeypatch.setattr(loading, "REPACK_ON_AMX", adopted)
    amx = "AMX" in cpu[0].extra_buffer_types
    with _engine(tiny.q4_k_m, "auto", monkeypatch, n_ctx=256) as engine:
        note = engine.info.weight_buffers
        buffers = _weight_buffers(engine)
        if not amx:
            # llama.cpp's default; no decode here: this machine may really have AMX
            assert note == "default"
            return
        answer = engine.generate([TokenRun(tuple(_tokens(40, 5)))], GREEDY).run()
    assert answer.stats.generated_tokens == GREEDY.max_tokens
    assert not any("AMX" in b.upper() for b in buffers)
    assert ("CPU_REPACK" in buffers) is adopted
    assert "AMX CPU" in note and ("CPU_REPACK" in note) is adopted


def test_offloaded_layers_keep_plain_buffers(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overrides would pin layers to the CPU: with layers offloaded (a simulated GPU
    build) the placement falls back to no repacking."""
    monkeypatch.setattr(loading, "supports_gpu_offload", lambda: True)
    with _engine(tiny.q4_k_m, "cpu_repack", monkeypatch, n_ctx=256, n_gpu_layers=-1) as engine:
        assert "CPU_REPACK" not in _weight_buffers(engine)
        assert "layers offloaded" in engine.info.weight_buffers


def test_unknown_placement_is_refused(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineError, match="cpu_repack"):
        _engine(tiny.q4_k_m, "amx", monkeypatch, n_ctx=256)
