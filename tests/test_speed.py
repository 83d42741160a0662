"""Speeds from measurement: the kernel calibration (real llama.cpp, at a narrow shape),
its cache, bench results replacing it, speeds by depth, and planning for a speed target
(--min-speed) on simulated machines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localsmall.bench.calibrate import CalibrationRequest, calibrate
from localsmall.bench.calibration_model import LayerShape
from localsmall.cli import app
from localsmall.errors import SpeedTargetError
from localsmall.models.catalog import load_catalog
from localsmall.plan.hardware import detect
from localsmall.plan.machine import PlanRequest, make_plan
from localsmall.plan.speed import (
    CALIBRATED_TYPES,
    Calibration,
    KernelTiming,
    MachineKey,
    MeasuredSpeed,
    SpeedInputs,
    bytes_per_weight,
)
from localsmall.plan.speed_cache import (
    cache_file,
    load_calibration,
    load_measured,
    save_calibration,
    save_measured,
)
from localsmall.runtime import speeds as runtime_speeds

MODEL = load_catalog().default
NARROW = LayerShape(n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
BANDWIDTH = 20e9    # the simulated machine's kernels: bytes per second when generating
PROMPT_FLOPS = 2e11  # ... and FLOP/s reading a prompt


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def simulated_calibration(key: MachineKey, *, attn_gen_s: float = 2e-8,
                          slower: float = 1.0) -> Calibration:
    """Kernel timings of a simulated machine: generation memory-bound at BANDWIDTH."""
    kernels = {t: KernelTiming(gen_s=(bytes_per_weight(t) or 1) / BANDWIDTH * slower,
                               pp_s=2 / PROMPT_FLOPS * slower) for t in CALIBRATED_TYPES}
    return Calibration(key=key, kernels=kernels, attn_gen_s=attn_gen_s, attn_pp_s=attn_gen_s / 8,
                       n_prompt=128, created="2026-01-01T00:00:00+00:00", seconds=5.0)


def key_here() -> MachineKey:
    return runtime_speeds.machine_key(detect())


@pytest.fixture
def calibrated() -> Calibration:
    """The test machine (LOCALSMALL_HARDWARE) with a calibration in the cache."""
    calibration = simulated_calibration(key_here())
    save_calibration(calibration)
    return calibration


def plan_json(*args: str) -> dict:
    result = invoke("plan", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- calibrating through the real llama.cpp ------------------------------------------------


def test_calibration_times_each_type_and_the_attention(tmp_path: Path) -> None:
    steps: list[tuple[str, int, int]] = []
    request = CalibrationRequest(shape=NARROW, types=("Q4_K", "Q8_0"), n_threads=2,
                                 n_prompt=32, n_gen=3, repetitions=1, depth=256, attention_layers=2,
                                 attention_n_embd=256, workdir=tmp_path)
    key = MachineKey("cpu", "build", "CPU", 2, "auto/v1")
    result = calibrate(request, key=key, on_progress=lambda *step: steps.append(step))
    assert set(result.kernels) == {"Q4_K", "Q8_0"} and result.key == key
    for timing in result.kernels.values():
        # seconds per weight: positive, and far below a microsecond on any machine
        assert 0 < timing.gen_s < 1e-6 and 0 < timing.pp_s < 1e-6
        # (no order between the two: on a narrow shape and a busy machine either can be
        # slower, and no test may depend on the machine's speed)
    assert result.attn_pp_s >= 0 and result.seconds > 0 and result.gen_overhead_s >= 0
    # timed, but never below each query head reading a cached position's K and V (f16)
    # at the fastest type's rate
    per_byte = min(t.gen_s / bytes_per_weight(k) for k, t in result.kernels.items())
    assert result.attn_gen_s >= 4 * 64 * 2 * 2 * per_byte * (1 - 1e-9)
    assert [s[1] for s in steps] == [0, 1, 2, 3] and steps[-1][2] == 3
    assert list(tmp_path.iterdir()) == []  # the calibration files are gone
    save_calibration(result)
    assert load_calibration(key) == result


def test_calibration_model_holds_one_type_at_the_shape_asked(tmp_path: Path) -> None:
    from localsmall.bench.calibration_model import write_calibration_model
    from localsmall.gguf_header import read_header

    path = write_calibration_model(tmp_path / "c.gguf", shape=NARROW, qtype="Q6_K",
                                   n_layers=2)
    header = read_header(path)
    matrices = [t for t in header.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert len(matrices) == 14 and {t.type for t in matrices} == {"Q6_K"}
    assert sum(t.shape[0] * t.shape[1] for t in matrices) == 2 * NARROW.layer_params
    assert header.arch_value("embedding_length") == 256


# --- the cache -------------------------------------------------------------------------------


def test_cache_keeps_entries_per_key_and_ignores_damage(tmp_path: Path) -> None:
    key = MachineKey("cpu A", "build 1", "CPU", 4, "auto/v1")
    other = dataclasses.replace(key, threads=2)
    first = simulated_calibration(key)
    save_calibration(first)
    save_calibration(simulated_calibration(other, slower=2))
    assert load_calibration(key) == first
    assert load_calibration(other).kernels["Q4_K"].gen_s == pytest.approx(
        2 * first.kernels["Q4_K"].gen_s)
    assert load_calibration(dataclasses.replace(key, build="build 2")) is None
    # a newer calibration for the same key replaces the older one
    save_calibration(simulated_calibration(key, slower=3))
    assert load_calibration(key).kernels["Q4_K"].gen_s == pytest.approx(
        3 * first.kernels["Q4_K"].gen_s)
    # a damaged entry is skipped, a damaged file is no cache at all
    data = json.loads(cache_file().read_text())
    data["calibrations"][0]["kernels"] = {"Q4_K": {"gen_s": -1, "pp_s": 1}}
    cache_file().write_text(json.dumps(data))
    assert load_calibration(other) is None and load_calibration(key) is not None
    cache_file().write_text("{not json")
    assert load_calibration(key) is None and load_measured(key) == ()
    assert not list(cache_file().parent.glob("*.partial"))


def test_no_calibration_for_a_simulated_machine_or_when_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Calibration:
        raise AssertionError("calibration must not run")

    monkeypatch.setattr(runtime_speeds, "run_calibration", refuse)
    monkeypatch.setenv("LOCALSMALL_CALIBRATE", "1")
    inputs = runtime_speeds.speed_inputs(MODEL, detect())  # LOCALSMALL_HARDWARE: simulated
    assert inputs.calibration is None
    assert plan_json()["choice"]["speed_source"] == "estimated"
    monkeypatch.delenv("LOCALSMALL_HARDWARE")
    monkeypatch.setenv("LOCALSMALL_CALIBRATE", "0")
    assert runtime_speeds.speed_inputs(MODEL, detect()).calibration is None
    assert invoke("plan", "--json").exit_code == 0


def test_a_cached_calibration_is_used_without_calibrating_again(
        calibrated: Calibration, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = runtime_speeds.run_calibration

    def counting(*args: object, **kwargs: object) -> Calibration:
        calls.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime_speeds, "run_calibration", counting)
    monkeypatch.setenv("LOCALSMALL_CALIBRATE", "1")
    data = plan_json("--ctx", "8192")
    assert calls == []
    choice = data["choice"]
    assert choice["speed_source"] == "calibrated" and choice["speed_depth"] == 8192
    # generation is memory-bound in this calibration: about BANDWIDTH / bytes per token
    size = choice["size"]
    assert BANDWIDTH / size < choice["tokens_per_s"] < 1.2 * BANDWIDTH / size
    assert choice["tokens_per_s_deep"] < choice["tokens_per_s"]
    assert choice["prompt_tps_deep"] < choice["prompt_tps"]
    # a slower machine's calibration halves every speed
    save_calibration(simulated_calibration(calibrated.key, slower=2))
    slow = plan_json("--ctx", "8192")["choice"]
    assert slow["tokens_per_s"] == pytest.approx(choice["tokens_per_s"] / 2, rel=0.01)
    assert slow["prompt_tps"] == pytest.approx(choice["prompt_tps"] / 2, rel=0.01)
    table = invoke("plan", "--ctx", "8192")
    assert "calibration of this machine" in table.stdout


# --- speed by depth --------------------------------------------------------------------------


def test_speed_falls_with_depth_by_the_attention_cost(calibrated: Calibration) -> None:
    empty = plan_json("--ctx", "32768", "--depth", "0")["choice"]
    assert empty["speed_depth"] == 0
    assert empty["tokens_per_s_deep"] == pytest.approx(empty["tokens_per_s"])
    deep = plan_json("--ctx", "32768", "--depth", "16384")["choice"]
    full = plan_json("--ctx", "32768")["choice"]
    assert full["speed_depth"] == 32768
    n_layers = full["n_layers"]
    for row, depth in ((deep, 16384), (full, 32768)):
        extra = 1 / row["tokens_per_s_deep"] - 1 / row["tokens_per_s"]
        assert extra == pytest.approx(n_layers * depth * calibrated.attn_gen_s, rel=1e-6)
    # --depth beyond the context is the full context
    assert plan_json("--ctx", "8192", "--depth", "100000")["choice"]["speed_depth"] == 8192


# --- bench results ---------------------------------------------------------------------------


def test_bench_results_replace_the_calibration_for_their_quant(calibrated: Calibration) -> None:
    save_measured([MeasuredSpeed(key=calibrated.key, quant="Q4_K_M", file="x.gguf",
                                 size_bytes=1, tg_tps=0.5, pp_tps=3.0, depth=0, n_ctx=4096,
                                 kv_type="f16", gpu_layers=0, created="2026-01-02T00:00:00")])
    data = plan_json("--ctx", "8192", "--depth", "0")
    rows = {o["quant"]: o for o in data["options"]}
    assert rows["Q4_K_M"]["speed_source"] == "measured"
    assert rows["Q4_K_M"]["tokens_per_s"] == pytest.approx(0.5)
    assert rows["Q4_K_M"]["prompt_tps"] == pytest.approx(3.0)
    assert rows["Q4_K_S"]["speed_source"] == "calibrated"
    # deeper, the calibrated attention cost moves the measured speed
    deep = plan_json("--ctx", "8192")["choice"]
    assert 1 / deep["tokens_per_s_deep"] == pytest.approx(
        2 + deep["n_layers"] * 8192 * calibrated.attn_gen_s)
    # another KV type or machine key: not this measurement
    assert plan_json("--ctx", "8192", "--kv-type", "q8_0")["choice"]["speed_source"] == \
        "calibrated"
    table = invoke("plan", "--ctx", "8192").stdout
    assert "Q4_K_M measured by `localsmall bench`" in table
    # a prompt measured in batches of 32 reads faster in the plan's batches of 512
    save_measured([MeasuredSpeed(key=calibrated.key, quant="Q4_K_M", file="x.gguf",
                                 size_bytes=1, tg_tps=0.5, pp_tps=3.0, depth=0, n_ctx=4096,
                                 kv_type="f16", gpu_layers=0, created="2026-01-03T00:00:00",
                                 n_prompt=32)])
    rows = {o["quant"]: o for o in plan_json("--ctx", "8192", "--depth", "0")["options"]}
    assert rows["Q4_K_M"]["prompt_tps"] > 3.0 and rows["Q4_K_M"]["tokens_per_s"] == 0.5


def test_bench_keeps_its_cpu_results_for_plan(tiny) -> None:
    result = invoke("bench", "--model", str(tiny.q4_k_m), "--no-vision", "-p", "16", "-n", "2",
                    "-r", "1", "--threads", "2", "--json")
    assert result.exit_code == 0, result.output
    key = runtime_speeds.machine_key(detect(), 2)
    (kept,) = load_measured(key)
    row = json.loads(result.stdout)["speed"][0]
    assert kept.file == str(tiny.q4_k_m) and kept.quant == row["name"]
    assert kept.tg_tps == pytest.approx(row["tg"]["mean"])
    assert kept.pp_tps == pytest.approx(row["pp"]["mean"])


# --- planning for a speed target -------------------------------------------------------------


def test_min_speed_already_met_keeps_the_plan(calibrated: Calibration) -> None:
    plain = plan_json()["choice"]
    target = plain["tokens_per_s_deep"] * 0.9
    fast = plan_json("--min-speed", f"{target}")
    assert (fast["choice"]["quant"], fast["choice"]["n_ctx"]) == (plain["quant"], plain["n_ctx"])
    assert "reaches the" in fast["reason"]


def test_min_speed_shrinks_the_context_before_the_quality(calibrated: Calibration) -> None:
    plain = plan_json()["choice"]
    assert plain["quant"] == "Q4_K_M" and plain["n_ctx"] == 32768
    at_16k = plan_json("--depth", "16384")["choice"]["tokens_per_s_deep"]
    target = (plain["tokens_per_s_deep"] + at_16k) / 2   # reached at 16K, not at 32K
    data = plan_json("--min-speed", f"{target}")
    assert (data["choice"]["quant"], data["choice"]["n_ctx"]) == ("Q4_K_M", 16384)
    assert data["choice"]["tokens_per_s_deep"] >= target
    assert "traded context (32,768 -> 16,384 tokens)" in data["reason"]


def test_min_speed_takes_a_smaller_quant_when_no_context_is_enough(
        calibrated: Calibration) -> None:
    floor = MODEL.min_context
    q4 = plan_json("mistral-small-3.2:Q4_K_M", "--ctx", f"{floor}", "--depth", "0")
    best_q4 = q4["choice"]["tokens_per_s"]
    data = plan_json("--min-speed", f"{best_q4 * 1.02}")
    choice = data["choice"]
    assert choice["quant"] not in ("Q4_K_M", "UD-Q4_K_XL")
    assert choice["tokens_per_s_deep"] >= best_q4 * 1.02
    assert "traded quality (Q4_K_M ->" in data["reason"]
    # the speed target also holds for `plan MODEL:QUANT`: the context shrinks for it
    pinned = plan_json("mistral-small-3.2:Q4_K_M", "--min-speed",
                       f"{q4['choice']['tokens_per_s'] * 0.99}")
    assert pinned["choice"]["quant"] == "Q4_K_M" and pinned["choice"]["n_ctx"] < 32768


def test_min_speed_nothing_reaches_is_a_clean_error(calibrated: Calibration) -> None:
    result = invoke("plan", "--min-speed", "500")
    assert result.exit_code == 1
    assert "Nothing reaches 500 tokens/s" in result.stderr and "Traceback" not in result.output
    assert "Lower --min-speed" in result.stderr
    assert invoke("plan", "--min-speed", "0").exit_code == 2
    with pytest.raises(SpeedTargetError):
        make_plan(MODEL, PlanRequest(speeds=SpeedInputs(min_speed=1e6)), detect())


@pytest.mark.parametrize("args", [("run", "--model", "FILE", "hi"),
                                  ("run", "--rpc", "127.0.0.1:9", "hi"),
                                  ("plan", "--rpc", "127.0.0.1:9=16GiB")])
def test_min_speed_is_refused_where_the_plan_cannot_keep_it(
        args: tuple[str, ...], tiny, calibrated: Calibration) -> None:
    """A fixed file or an RPC split: refused before anything loads, not ignored (chat
    and serve start through the same runtime.start.prepare as run)."""
    from localsmall.errors import UsageError
    from localsmall.runtime.options import RunOptions
    from localsmall.runtime.start import prepare

    with pytest.raises(UsageError, match="--model FILE the build is fixed"):
        prepare(RunOptions(model_path=tiny.q4_k_m, min_speed=5))
    args = tuple(str(tiny.q4_k_m) if a == "FILE" else a for a in args)
    result = invoke(*args, "--min-speed", "5")
    assert result.exit_code == 2, result.output
    said = " ".join(result.stderr.split())   # the console wraps long lines
    reason = "--model FILE the build is fixed" if "--model" in args else "does not work with --rpc"
    assert said.startswith("error: --min-speed") and reason in said
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["24 GB GPU", "12 GB GPU + 32 GB RAM"])
def test_min_speed_on_gpu_machines_uses_estimates(name: str) -> None:
    from localsmall.plan.rules import plan
    from tests.test_planner import MACHINES  # the planner tests' simulated machines

    hardware = MACHINES[name]
    plain = plan(MODEL, hardware, speeds=SpeedInputs()).choice
    assert plain is not None and plain.where in ("gpu", "split")
    assert plain.speed_source == "estimated" and plain.prompt_tps is None
    target = plain.tokens_per_s_deep * 1.1
    faster = plan(MODEL, hardware, speeds=SpeedInputs(min_speed=target))
    assert faster.choice is not None and faster.choice.tokens_per_s_deep >= target
    assert (faster.choice.quant, faster.choice.n_ctx) != (plain.quant, plain.n_ctx)
    assert "To reach" in faster.reason
    with pytest.raises(SpeedTargetError, match="Nothing reaches"):
        plan(MODEL, hardware, speeds=SpeedInputs(min_speed=plain.tokens_per_s * 100))


def test_chat_plans_for_its_min_speed(calibrated: Calibration) -> None:
    # Nothing is downloaded: the error names the build the speed target chose.
    at_floor = plan_json("mistral-small-3.2:Q4_K_M", "--ctx", f"{MODEL.min_context}",
                         "--depth", "0")["choice"]["tokens_per_s"]
    plain = invoke("chat")
    assert "Q4_K_M is not downloaded yet" in plain.stderr
    fast = invoke("chat", "--min-speed", f"{at_floor * 1.02}")
    assert fast.exit_code == 1 and "is not downloaded yet" in fast.stderr
    assert "Q4_K_M is not downloaded" not in fast.stderr
    hopeless = invoke("serve", "--min-speed", "1000")
    assert hopeless.exit_code == 1 and "Nothing reaches 1000 tokens/s" in hopeless.stderr


def test_block_sizes_agree_with_gguf() -> None:
    import gguf

    from localsmall.gguf_header import COMMON_BLOCKS

    for name, sizes in COMMON_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == sizes
    assert bytes_per_weight("IQ2_XXS") == pytest.approx(66 / 256)  # from gguf's table
    assert bytes_per_weight("NOT_A_TYPE") is None


def test_small_prompt_batches_pay_for_reading_the_weights() -> None:
    from localsmall.plan.speed import prompt_per_weight

    timing = KernelTiming(gen_s=1e-9, pp_s=2e-11)
    assert prompt_per_weight(timing, 128, 1) == pytest.approx(timing.gen_s)
    assert prompt_per_weight(timing, 128, 128) == pytest.approx(timing.pp_s)
    costs = [prompt_per_weight(timing, 128, n) for n in (1, 8, 32, 128, 512)]
    assert costs == sorted(costs, reverse=True) and costs[-1] > 0


def test_a_failed_calibration_leaves_the_speeds_estimated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from localsmall.errors import DiskSpaceError

    tried: list[object] = []

    def fail(*args: object, **kwargs: object) -> Calibration:
        tried.append(args)
        raise DiskSpaceError("no space left on the disk")

    monkeypatch.setattr(runtime_speeds, "run_calibration", fail)
    monkeypatch.setenv("LOCALSMALL_CALIBRATE", "1")
    monkeypatch.delenv("LOCALSMALL_HARDWARE")
    result = invoke("plan", "--json")
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["options"]
    assert tried and {o["speed_source"] for o in options} == {"estimated"}
