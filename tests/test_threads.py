"""The default thread counts (localsmall.engine.threads) and what `localsmall doctor`
says about them, on simulated machines: the choice, its reason and the advice when
other programs keep the cores busy. No timing is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.engine import devices, threads
from localsmall.engine.threads import choose_threads


def test_one_thread_per_physical_core_for_generation_and_prompts() -> None:
    smt = choose_threads(physical_cores=8, logical_cpus=16)
    assert (smt.generation, smt.prompt) == (8, 8)
    assert "one per physical core" in smt.reason and "16 logical CPUs" in smt.reason
    assert "memory-bound" in smt.reason and smt.advice == ""
    plain = choose_threads(physical_cores=2, logical_cpus=2)
    assert (plain.generation, plain.prompt) == (2, 2) and "one per core" in plain.reason
    # a process pinned to fewer CPUs than the cores gets no more threads than CPUs
    assert choose_threads(physical_cores=8, logical_cpus=3).generation == 3
    assert choose_threads(physical_cores=0, logical_cpus=4).generation == 4


@pytest.mark.parametrize(("cores", "load", "advised"), [
    (2, 0.3, None), (2, 1.2, None), (2, 1.6, 1), (2, 8.8, 1), (8, 3.0, 5), (1, 9.0, None),
])
def test_busy_cores_bring_advice_when_threads_spin(cores: int, load: float,
                                                   advised: int | None) -> None:
    spinning = choose_threads(physical_cores=cores, logical_cpus=cores, load_average=load,
                              policy="active")
    assert spinning.generation == cores  # the default itself does not follow the load
    assert "spin (OMP_WAIT_POLICY=ACTIVE)" in spinning.reason
    if advised is None:
        assert spinning.advice == ""
    else:
        assert f"--threads {advised};" in spinning.advice and f"{load:.1f}" in spinning.advice
    # sleeping threads (the engine's default) leave busy cores to their programs
    sleeping = choose_threads(physical_cores=cores, logical_cpus=cores, load_average=load)
    assert sleeping.advice == "" and "OMP_WAIT_POLICY=PASSIVE" in sleeping.reason


@pytest.mark.parametrize(("given", "used"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_llama_cpp_loads_with_passive_threads_unless_told_otherwise(
        given: str | None, used: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os; from localsmall.engine import native; native.llama(); "
            "print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == used


def test_engine_default_is_the_detected_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.default_threads() == threads.detect_threads().generation
    monkeypatch.setattr(threads, "available_cpus", lambda: 5)
    monkeypatch.setattr(threads, "physical_cores", lambda available: 3)
    assert devices.default_threads() == 3


def test_doctor_says_what_was_chosen_and_why_on_a_simulated_machine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest describes a CPU-only machine with 8 cores and 16 logical CPUs
    monkeypatch.delenv("LOCALSMALL_WEIGHT_REPACK", raising=False)
    runner = CliRunner()
    data = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)
    chosen = data["threads"]
    assert (chosen["generation"], chosen["prompt"], chosen["physical_cores"]) == (8, 8, 8)
    assert chosen["load_average"] is None and chosen["advice"] == ""  # a described machine
    assert "8 threads" in chosen["reason"] and "one per physical core" in chosen["reason"]
    assert "llama.cpp's default" in data["weight_placement"]  # no AMX_INT8 in its features
    text = runner.invoke(app, ["doctor"], env={"COLUMNS": "300"}).stdout
    assert "llama.cpp threads" in text and "8 threads for generation and prompt" in text


def test_doctor_on_this_machine_warns_when_its_cores_are_busy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCALSMALL_HARDWARE")
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads, "physical_cores", lambda available: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 7.5)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    data = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).stdout)
    assert data["threads"]["generation"] == 2 and data["threads"]["load_average"] == 7.5
    assert data["threads"]["wait_policy"] == "ACTIVE"
    assert any("--threads 1" in w for w in data["warnings"])
    monkeypatch.setattr(threads, "load_average", lambda: 0.2)
    calm = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).stdout)
    assert not any("--threads" in w for w in calm["warnings"])
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(threads, "load_average", lambda: 7.5)
    sleeping = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).stdout)
    assert not any("--threads" in w for w in sleeping["warnings"])
    assert "sleep (OMP_WAIT_POLICY=PASSIVE)" in sleeping["threads"]["reason"]


def test_doctor_names_the_weight_placement_of_an_amx_cpu(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path) -> None:
    from tests.conftest import TEST_MACHINE

    machine = json.loads(json.dumps(TEST_MACHINE))
    machine["cpu"]["features"] = ["AVX512", "AMX_INT8", "REPACK"]
    path = tmp_path / "amx.json"
    path.write_text(json.dumps(machine))
    monkeypatch.setenv("LOCALSMALL_HARDWARE", str(path))
    monkeypatch.delenv("LOCALSMALL_WEIGHT_REPACK", raising=False)
    data = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).stdout)
    assert "llama.cpp #20824" in data["weight_placement"]
    monkeypatch.setenv("LOCALSMALL_WEIGHT_REPACK", "cpu_repack")
    data = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).stdout)
    assert "CPU_REPACK" in data["weight_placement"] and "AMX unused" in data["weight_placement"]
