"""The benchmarks' references place quantized weights as localsmall does, decided by one
helper (benchmarks/placement.py): on a CPU with Intel AMX no repacking (llama.cpp's AMX
buffer crashes on batched decodes, llama.cpp #20824), elsewhere llama.cpp's default.

The CPU is simulated (a BackendDevice list), so machines without AMX check the AMX case
and AMX machines the other one; the references themselves are built with the real
llama.cpp on a tiny quantized model. No timing is measured."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from localsmall.engine import devices, native
from localsmall.engine.buffers import parse_buffer_lines
from localsmall.engine.devices import BackendDevice, cpu_has_amx_repack, list_devices
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_vs_llama_bench
import placement
import run_overhead
import weight_repack


def _cpu(*extra_bufts: str) -> list[BackendDevice]:
    """A simulated CPU device offering these extra buffer types."""
    return [BackendDevice(index=0, name="CPU", description="simulated Xeon", kind="cpu",
                          backend="CPU", memory_free=16 << 30, memory_total=32 << 30,
                          extra_buffer_types=extra_bufts,
                          features=(("AVX512", "1"), ("AMX_INT8", "1"), ("REPACK", "1")))]


AMX_CPU = _cpu("AMX", "CPU_REPACK")
PLAIN_CPU = _cpu("CPU_REPACK")


def _extra_buffers(lines: list[str]) -> list[str]:
    """Model weight buffers that are llama.cpp's extra (repacked) buffer types."""
    return [b.buffer for b in parse_buffer_lines(lines)
            if b.kind == "model" and ("AMX" in b.buffer.upper() or "REPACK" in b.buffer.upper())]


def test_the_helper_sees_amx_as_the_engine_does() -> None:
    assert placement.has_amx(AMX_CPU) and not placement.has_amx(PLAIN_CPU)
    assert placement.has_amx(list_devices()) == cpu_has_amx_repack()  # this machine


@pytest.mark.parametrize(("cpu", "mode", "repack"), [
    (AMX_CPU, "auto", False), (PLAIN_CPU, "auto", True), (AMX_CPU, "off", False),
    (PLAIN_CPU, "off", False), (AMX_CPU, "on", True),
])
def test_placement_follows_the_weight_repack_setting(cpu: list[BackendDevice], mode: str,
                                                     repack: bool) -> None:
    chosen = placement.reference_placement(devices=cpu,
                                           environ={"LOCALSMALL_WEIGHT_REPACK": mode})
    assert chosen.repack is repack
    assert chosen.note


@pytest.mark.parametrize("cpu", [AMX_CPU, PLAIN_CPU], ids=["amx", "plain"])
def test_engine_and_llama_cpp_python_reference_place_weights_alike(
        tiny, monkeypatch: pytest.MonkeyPatch, cpu: list[BackendDevice]) -> None:
    """run_overhead.py's `Llama` reference gets the placement localsmall's Engine takes on
    the same (simulated) CPU; kv_followup.py and plan_memory.py measure through the Engine."""
    monkeypatch.delenv("LOCALSMALL_WEIGHT_REPACK", raising=False)
    monkeypatch.setattr(devices, "list_devices", lambda: cpu)
    chosen = placement.reference_placement(devices=cpu)
    with Engine(EngineSettings(model_path=tiny.q4_k_m, n_ctx=256, n_threads=2)) as engine:
        assert bool(engine.repack_note) is not chosen.repack

    with native.capture_log() as lines:
        llm = run_overhead.reference_llama(tiny.q4_k_m, n_ctx=256, placement=chosen)
    try:
        assert llm.model_params.use_extra_bufts is chosen.repack
        assert parse_buffer_lines(lines), "llama.cpp's buffer report was not captured"
        if not chosen.repack:
            assert _extra_buffers(lines) == []
    finally:
        llm.close()


def test_weight_repack_skips_repacking_on_an_amx_cpu() -> None:
    on_amx = weight_repack.modes(placement.reference_placement(devices=AMX_CPU, environ={}))
    assert on_amx["off"] == "" and "AMX" in on_amx["on"] and "\n" not in on_amx["on"]
    assert on_amx["cpu_repack"] == ""  # CPU_REPACK without AMX runs on any CPU
    elsewhere = weight_repack.modes(placement.reference_placement(devices=PLAIN_CPU,
                                                                  environ={}))
    assert elsewhere == {"on": "", "off": "", "cpu_repack": ""}


def test_llama_bench_runs_without_repacking_on_an_amx_cpu() -> None:
    args = argparse.Namespace(n_prompt=512, n_gen=128, repetitions=5, threads=2,
                              gpu_layers=0, batch=512)

    def command(cpu: list[BackendDevice]) -> list[str]:
        chosen = placement.reference_placement(devices=cpu, environ={})
        return bench_vs_llama_bench.llama_bench_command(Path("llama-bench"), Path("m.gguf"),
                                                        args, chosen)

    assert command(AMX_CPU)[-2:] == ["--repack", "0"]
    assert command(PLAIN_CPU)[-2:] == ["--repack", "1"]
