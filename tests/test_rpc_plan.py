"""`plan --rpc`: splitting the model over this machine and RPC workers by memory, on
simulated workers (HOST:PORT=SIZE) and a simulated machine; no worker is contacted."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.models.catalog import load_catalog
from localsmall.plan.memory import RunShape, layer_devices, text_weights_from_catalog
from localsmall.plan.rpc import WorkerMemory, parse_worker_memory, split

runner = CliRunner()
GIB = 1024**3


@pytest.fixture
def small_machine(tmp_path, monkeypatch) -> None:
    """This machine: 9 GiB of RAM available (8 GiB after the planner's reserve)."""
    machine = tmp_path / "small.json"
    machine.write_text(json.dumps({"gpus": [], "gpu_offload": False, "ram_total": 16 * GIB,
                                   "ram_available": 9 * GIB,
                                   "cpu": {"model": "test", "physical_cores": 8,
                                           "logical_cores": 16}}))
    monkeypatch.setenv("LOCALSMALL_HARDWARE", str(machine))


def _plan(*args: str) -> dict:
    result = runner.invoke(app, ["plan", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _chosen(data: dict) -> dict:
    return next(o for o in data["options"] if o["quant"] == data["choice"])


def test_plan_splits_layers_by_the_memory_each_device_has(small_machine) -> None:
    data = _plan("--rpc", "10.0.0.2:50052=8GiB,10.0.0.3:50052=16GiB")
    option = _chosen(data)
    here, a, b = option["shares"]
    assert [s["endpoint"] for s in option["shares"]] == [None, "10.0.0.2:50052",
                                                         "10.0.0.3:50052"]
    assert here["n_layers"] + a["n_layers"] + b["n_layers"] == 40
    assert all(s["fits"] and s["total"] <= s["budget"] for s in option["shares"])
    # Twice the memory, about twice the layers; the output head on the last worker,
    # the projector on this machine (mtmd runs it locally).
    assert 1.6 <= b["n_layers"] / a["n_layers"] <= 2.4
    assert b["output"] and not a["output"] and not here["output"]
    assert here["projector"] > 0 and a["projector"] == b["projector"] == 0
    # 30.7 GiB together: the best quality, Q8_0 (23.3 GiB of weights), now fits.
    assert data["choice"] == "Q8_0"
    # What llama.cpp is told places exactly these layers (its rule, mirrored).
    devices = layer_devices(40, option["n_gpu_layers"], option["tensor_split"])
    assert [devices[:-1].count(i) for i in range(3)] == [s["n_layers"] for s in
                                                         option["shares"]]
    assert devices[-1] == 2


def test_plan_without_enough_memory_anywhere_says_so(small_machine) -> None:
    data = _plan("--rpc", "10.0.0.2:50052=1GiB,10.0.0.3:50052=1GiB")
    assert data["choice"] is None
    assert "No build fits" in data["reason"]


def test_plan_shows_the_split_and_the_network_cost(small_machine) -> None:
    result = runner.invoke(app, ["plan", "mistral-small-3.2:Q4_K_M", "--rpc",
                                 "10.0.0.2:50052=12GiB"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "this machine (CPU)" in text and "10.0.0.2:50052" in text
    assert "output head" in text and "per generated token" in text


def test_split_gives_a_bigger_worker_more_layers() -> None:
    model = load_catalog().default
    text = text_weights_from_catalog(model, model.quant("Q4_K_M"))
    run = RunShape(n_ctx=8192)
    workers = [WorkerMemory("a:1", "RPC0", 6 * GIB, 6 * GIB),
               WorkerMemory("b:1", "RPC1", 12 * GIB, 12 * GIB)]
    result = split(text, run, local_budget=2 * GIB, workers=workers)
    counts = [s.n_layers for s in result.shares]
    assert sum(counts) == 40 and counts[2] > counts[1] > counts[0]
    assert result.fits
    # Forced counts are honoured, and a device over its budget makes the split not fit.
    forced = split(text, run, local_budget=2 * GIB, workers=workers, counts=[20, 10, 10])
    assert [s.n_layers for s in forced.shares] == [20, 10, 10]
    assert not forced.fits and not forced.shares[0].fits


def test_worker_memory_specs() -> None:
    assert parse_worker_memory("10.0.0.2:50052=16GiB").memory_free == 16 * GIB  # type: ignore[union-attr]
    assert parse_worker_memory("10.0.0.2:50052") is None
    result = runner.invoke(app, ["plan", "--rpc", "10.0.0.2:50052=lots"])
    assert result.exit_code == 2
    assert "HOST:PORT=16GiB" in result.stderr
