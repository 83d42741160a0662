"""How well the planner's memory model predicts llama.cpp, on a model shaped like Mistral
Small 3.2 but smaller: the real 131K vocabulary (so the 256 MiB logits buffer and the
embedding sizes are real), decoupled head_dim 128 and grouped-query attention, fewer and
narrower layers, quantized to Q4_K_M by llama.cpp's own quantizer (its real mix of
Q4_K/Q6_K tensors), plus a Pixtral projector at the real encoder width (1024, FFN 4096,
16 heads) with 2 layers.

It loads the model with the engine at several contexts and cache types and prints, per
buffer kind, predicted / llama.cpp-reported sizes; then the projector's compute buffer
for the largest image (1024 tokens = 4096 patches): llama.cpp logs only its 256-token
warm-up buffer, so a copy of the projector with a 4x4 patch merger (whose warm-up image
has 4096 patches) is loaded to make it log that size; then process RSS after reading a
prompt and after encoding the largest image, against the prediction.
Target: every ratio within 10%. The RSS ratio leaves out the logits rows of a batch,
which llama.cpp reserves but never writes on the CPU (it computes only the last row).

    .venv/bin/python benchmarks/plan_memory.py        # ~2-4 minutes on 2 cores
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from placement import reference_placement

from localsmall.convert.gguf_files import TextHParams, VisionHParams
from localsmall.engine import native
from localsmall.engine.buffers import (
    parse_buffer_lines,
    total,
)
from localsmall.engine.devices import list_devices
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings, TokenRun
from localsmall.errors import ModelLoadError
from localsmall.plan.memory import (
    RunShape,
    VisionWeights,
    estimate,
    repack_types,
    text_weights_from_file,
    vision_compute_bytes,
    vision_weights_from_file,
    vision_work_bytes,
)
from tests import tinymodels as tm

CACHE = Path(__file__).resolve().parent / ".cache" / "plan_memory"
MERGE4 = CACHE / "synthetic-mmproj-merge4-F16.gguf"
MIB = 1024 * 1024
SHAPE = TextHParams(n_layers=8, n_embd=1280, n_head=8, n_head_kv=2, head_dim=128, n_ff=8192,
                    n_vocab=131072)
VISION = VisionHParams(n_layers=2, n_embd=1024, n_head=16, n_ff=4096,
                       projection_dim=SHAPE.n_embd)
CASES = [(4096, "f16"), (32768, "f16"), (32768, "q8_0"), (131072, "q4_0")]
THREADS = 2
TARGET = 0.10


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(
        np.float16)


def build_models() -> tuple[Path, Path]:
    """The synthetic Q4_K_M text model and F16 projector (cached between runs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    text, mmproj = CACHE / "synthetic-Q4_K_M.gguf", CACHE / "synthetic-mmproj-F16.gguf"
    if not MERGE4.exists():
        zeros = {"token_embd.weight": np.zeros((SHAPE.n_vocab, SHAPE.n_embd), np.float32)}
        tm.write_mmproj(MERGE4, zeros, vp=replace(VISION, spatial_merge_size=4), dtype="f16")
    if text.exists() and mmproj.exists():
        return text, mmproj
    rng = np.random.default_rng(0)
    hp = SHAPE
    q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    tensors = {"token_embd.weight": _random(rng, hp.n_vocab, hp.n_embd)}
    for i in range(hp.n_layers):
        p = f"blk.{i}."
        tensors |= {
            p + "attn_norm.weight": np.ones(hp.n_embd, np.float32),
            p + "attn_q.weight": _random(rng, q_dim, hp.n_embd),
            p + "attn_k.weight": _random(rng, kv_dim, hp.n_embd),
            p + "attn_v.weight": _random(rng, kv_dim, hp.n_embd),
            p + "attn_output.weight": _random(rng, hp.n_embd, q_dim),
            p + "ffn_norm.weight": np.ones(hp.n_embd, np.float32),
            p + "ffn_gate.weight": _random(rng, hp.n_ff, hp.n_embd),
            p + "ffn_up.weight": _random(rng, hp.n_ff, hp.n_embd),
            p + "ffn_down.weight": _random(rng, hp.n_embd, hp.n_ff),
        }
    tensors["output_norm.weight"] = np.ones(hp.n_embd, np.float32)
    tensors["output.weight"] = _random(rng, hp.n_vocab, hp.n_embd)
    f16 = CACHE / "synthetic-F16.gguf"
    print("writing the F16 model ...", flush=True)
    tm.write_text_model(f16, hp=hp, tensors=tensors, chat_template=tm.builtin_template())
    del tensors
    gc.collect()
    print("quantizing to Q4_K_M with llama.cpp ...", flush=True)
    tm.quantize(f16, text, "Q4_K_M")
    f16.unlink()
    print("writing the projector ...", flush=True)
    tm.write_mmproj(mmproj, {"token_embd.weight": np.zeros((hp.n_vocab, hp.n_embd),
                                                             np.float32)}, vp=VISION,
                    dtype="f16")
    return text, mmproj


def _ratio(predicted: int, actual: int) -> str:
    if actual <= 0:
        return "   n/a"
    ratio = predicted / actual
    flag = "ok" if abs(ratio - 1) <= TARGET else "OFF"
    return f"{ratio:6.3f} {flag}"


def this_cpu_repacks() -> frozenset[str]:
    cpu = next(d for d in list_devices() if d.kind == "cpu")
    # The engine loads these models with the same placement (no repacking on AMX CPUs).
    if "CPU_REPACK" not in cpu.extra_buffer_types or not reference_placement().repack:
        return frozenset()
    return repack_types(name for name, value in cpu.features if value not in ("0", ""))


def buffers_table(text_path: Path, mmproj: Path) -> None:
    text = text_weights_from_file(text_path)
    repack = this_cpu_repacks()
    vision = vision_weights_from_file(mmproj, max_tokens=256)  # mtmd's warm-up image
    print(f"\nmodel: {text_path.name}, {text.total / MIB:.0f} MiB of weights, "
          f"{text.shape.n_layers} layers, vocab {text.shape.n_vocab}")
    print(f"{'ctx':>7} {'kv':>5}  {'kind':<18} {'predicted':>11} {'llama.cpp':>11}  ratio")
    for n_ctx, kv_type in CASES:
        run = RunShape(n_ctx=n_ctx, kv_type=kv_type)
        cpu = estimate(text, run, vision=vision, repack=repack).on("CPU")
        vision_compute = vision_compute_bytes(vision)
        settings = EngineSettings(model_path=text_path, mmproj_path=mmproj, n_ctx=n_ctx,
                                  kv_type=kv_type, n_threads=THREADS)
        with Engine(settings) as engine:
            b = engine.buffers
        rows = [("weights+repacked", cpu.weights + cpu.repacked, total(b, kinds=["model"])),
                ("KV cache", cpu.kv, total(b, kinds=["kv"])),
                ("compute + output", cpu.compute, total(b, kinds=["compute", "output"])),
                ("projector weights", vision.weights, total(b, kinds=["projector"])),
                ("projector compute", vision_compute, total(b, kinds=["projector_compute"]))]
        rows.append(("total", sum(r[1] for r in rows), total(b)))
        for kind, predicted, actual in rows:
            print(f"{n_ctx:>7} {kv_type:>5}  {kind:<18} {predicted / MIB:>9.1f}Mi "
                  f"{actual / MIB:>9.1f}Mi  {_ratio(predicted, actual)}")


def largest_image_buffer(text_path: Path) -> None:
    """The compute buffer at 4096 patches, as llama.cpp reserves it (see docstring)."""
    vision = vision_weights_from_file(MERGE4)
    wanted = vision_compute_bytes(VisionWeights(**{**vision.__dict__, "merge": 2,
                                                   "max_tokens": 1024}))
    settings = EngineSettings(model_path=text_path, mmproj_path=MERGE4, n_ctx=4096,
                              n_threads=THREADS)
    # The engine refuses a 4x4 merger, after mtmd has reserved (and logged) its buffer.
    with native.capture_log() as lines, contextlib.suppress(ModelLoadError):
        Engine(settings).close()
    reserved = total(parse_buffer_lines(lines), kinds=["projector_compute"])
    print(f"\nprojector compute buffer for 4096 patches: predicted {wanted / MIB:.1f} MiB, "
          f"llama.cpp {reserved / MIB:.1f} MiB -> ratio {_ratio(wanted, reserved)}")


def rss_check(text_path: Path, mmproj: Path) -> None:
    import gguf  # noqa: F401  (Python's own imports are not llama.cpp's memory)

    from localsmall.images import prepare_image_bytes

    native.llama()
    n_ctx = 32768
    text = text_weights_from_file(text_path)
    vision_warmup = vision_weights_from_file(mmproj, max_tokens=256)
    vision_max = vision_weights_from_file(mmproj, max_tokens=1024)
    cpu = estimate(text, RunShape(n_ctx=n_ctx), vision=vision_warmup,
                   repack=this_cpu_repacks()).on("CPU")
    # What llama.cpp holds after loading, repacked copies and vocabulary tables included.
    # (The warm-up projector buffer is reserved but written only by the first encode.)
    loaded = (cpu.weights + cpu.repacked + cpu.kv + cpu.compute + cpu.tables
              + vision_warmup.weights)
    logits_rows = text.shape.n_vocab * (RunShape(n_ctx=n_ctx).n_ubatch - 1) * 4
    before = _rss()
    settings = EngineSettings(model_path=text_path, mmproj_path=mmproj, n_ctx=n_ctx,
                              n_threads=THREADS)
    with Engine(settings) as engine:
        prompt = engine.tokenize("<s>[INST]" + "memory " * 500 + "[/INST]", special=True)
        engine.generate([TokenRun(tuple(prompt))], SamplingSettings(temperature=0,
                                                                    max_tokens=4)).run()
        grown = _rss() - before
        print(f"\nRSS growth after load + {len(prompt)}-token prompt: {grown / MIB:.0f} MiB; "
              f"predicted {(loaded - logits_rows) / MIB:.0f} MiB (buffers without the "
              f"unwritten logits rows) -> ratio {_ratio(loaded - logits_rows, grown)}")
        warmup = vision_compute_bytes(vision_warmup)
        image = prepare_image_bytes(tm.image_bytes(896, 896), "largest.png")
        assert engine.projector is not None
        start, t0 = _rss(), time.perf_counter()
        engine.projector.encode(image)
        growth = _rss() - start
        output = image.n_tokens * text.shape.n_embd * 4  # the embeddings kept afterwards
        # The warm-up buffer was reserved but never written: its pages were not resident.
        wanted = vision_compute_bytes(vision_max) + vision_work_bytes(vision_max)
        print(f"RSS growth encoding the largest image first ({image.n_tokens} positions, "
              f"{time.perf_counter() - t0:.0f} s): {(growth - output) / MIB:.0f} MiB "
              f"(embeddings kept: {output / MIB:.0f} MiB left out; warm-up buffer "
              f"{warmup / MIB:.0f} MiB freed unwritten); predicted compute + work "
              f"{wanted / MIB:.0f} MiB -> ratio {_ratio(wanted, growth - output)}")


def main() -> None:
    text, mmproj = build_models()
    buffers_table(text, mmproj)
    largest_image_buffer(text)
    rss_check(text, mmproj)


if __name__ == "__main__":
    main()
