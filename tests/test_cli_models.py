"""plan, pull, list, rm, doctor, and chat/run's offer to pull, through the CLI runner
against a Hub on 127.0.0.1, planning for the tests' simulated machine (CPU-only, 64 GB,
see conftest: the plan is Q4_K_M on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.models.catalog import load_catalog
from tests.conftest import LocalHub, go_offline
from tests.hubserver import write_small_gguf

GIB = 1024**3
MODEL = load_catalog().default
Q2 = MODEL.quant("Q2_K").remote
Q4 = MODEL.quant("Q4_K_M").remote
PROJECTOR = MODEL.projector.remote


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def small_files(hub: LocalHub, tmp_path: Path) -> dict[str, bytes]:
    """Small GGUFs served under the catalog's Q2_K and projector names."""
    files = {Q2.file: write_small_gguf(tmp_path / "q2.gguf", 1024 * 1024).read_bytes(),
             PROJECTOR.file: write_small_gguf(tmp_path / "p.gguf", 256 * 1024, 1).read_bytes()}
    for name, data in files.items():
        hub.state.add(Q2.repo, name, data)
    return files


def test_plan_table_and_json() -> None:
    table = invoke("plan")
    assert table.exit_code == 0, table.output
    assert "➜" in table.stdout and "Q4_K_M is the best quality" in table.stdout
    data = json.loads(invoke("plan", "--json", "--ctx", "8192", "--kv-type", "q8_0").stdout)
    assert data["choice"]["quant"] == "Q4_K_M" and data["choice"]["n_ctx"] == 8192
    assert data["kv_type"] == "q8_0" and len(data["options"]) == len(MODEL.quants)
    cpu = data["choice"]["devices"][0]
    assert cpu["device"] == "CPU" and cpu["total"] == data["choice"]["ram_bytes"]
    assert {o["where"] for o in data["options"]} <= {"gpu", "split", "cpu", "none"}
    pinned = json.loads(invoke("plan", "mistral-small-3.2:Q8_0", "--json").stdout)
    assert pinned["choice"]["quant"] == "Q8_0"


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "--kv-type", "q5_9"], "--kv-type must be one of"),
    (["plan", "--ctx", "100"], "--ctx must be at least 256"),
    (["plan", "nosuchmodel"], "unknown model"),
    (["pull", "mistral-small-3.2:Q9_K"], "no quant 'Q9_K'"),
    (["rm", "mistral-small-3.2"], "MODEL:QUANT"),
    (["rm", "mistral-small-3.2:Q2_K"], "is not downloaded"),
])
def test_bad_arguments_get_one_line_errors(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.output


def test_pull_list_and_rm(hub: LocalHub, small_files: dict[str, bytes]) -> None:
    pulled = invoke("pull", "mistral-small-3.2:Q2_K")
    assert pulled.exit_code == 0, pulled.output
    assert "sha256 verified" in pulled.stderr and "is ready" in pulled.stderr
    builds = json.loads(invoke("list", "--json").stdout)
    assert [(b["quant"], b["verified"], b["projector"], b["source"]) for b in builds] == [
        ("Q2_K", "yes", True, "hub")]
    assert builds[0]["size"] == len(small_files[Q2.file])
    assert "Q2_K" in invoke("list").stdout
    from localsmall.hub import cache as hubcache

    removed = invoke("rm", "mistral-small-3.2:Q2_K")
    assert removed.exit_code == 0 and "removed mistral-small-3.2:Q2_K" in removed.stderr
    assert json.loads(invoke("list", "--json").stdout) == []
    assert hubcache.cached_file(Q2) is None
    # the projector stays until it is removed by name
    projector = hubcache.cached_file(PROJECTOR)
    assert projector is not None and projector.exists()
    gone = invoke("rm", "mistral-small-3.2:projector")
    assert gone.exit_code == 0 and "removed mistral-small-3.2 vision projector" in gone.stderr
    assert hubcache.cached_file(PROJECTOR) is None and not projector.exists()
    again = invoke("rm", "mistral-small-3.2:projector")
    assert again.exit_code == 1 and "no projector of mistral-small-3.2" in again.stderr


def test_pull_errors_are_one_line(hub: LocalHub, small_files: dict[str, bytes],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    missing = invoke("pull", "mistral-small-3.2:Q3_K_M")  # not served: not in the repo
    assert missing.exit_code == 1 and "has no file" in missing.stderr
    go_offline(monkeypatch)
    offline = invoke("pull", "mistral-small-3.2:Q2_K")
    assert offline.exit_code == 1 and "HF_HUB_OFFLINE" in offline.stderr


def test_doctor_reports_machine_and_cache(monkeypatch: pytest.MonkeyPatch,
                                          isolated_home: Path) -> None:
    from localsmall.plan import hardware

    text = invoke("doctor")
    assert text.exit_code == 0 and "test CPU" in text.stdout and "download cache" in text.stdout
    data = json.loads(invoke("doctor", "--json").stdout)
    assert data["hardware"]["ram_total"] == 64 * GIB
    assert data["cache_dir"] == str(isolated_home / "hf" / "hub")
    from importlib.metadata import version

    assert data["versions"]["llama-cpp-python"] == version("llama-cpp-python")
    # The real machine, as a CPU-only build of llama.cpp sees it (whatever this build
    # is), with an NVIDIA card that build cannot use.
    from localsmall.engine import devices

    cpu_only = [d for d in devices.list_devices() if d.kind == "cpu"]
    monkeypatch.setattr(devices, "supports_gpu_offload", lambda: False)
    monkeypatch.setattr(devices, "list_devices", lambda: cpu_only)
    monkeypatch.delenv("LOCALSMALL_HARDWARE")
    monkeypatch.setattr(hardware, "_run", lambda *cmd: "NVIDIA GeForce RTX 4090, 24564\n"
                        if cmd[0] == "nvidia-smi" else "")
    detected = json.loads(invoke("doctor", "--json").stdout)
    assert detected["hardware"]["gpu_offload"] is False
    assert detected["hardware"]["unusable_gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert any('CMAKE_ARGS="-DGGML_CUDA=on"' in w for w in detected["warnings"])


def test_chat_without_a_terminal_names_the_pull_command() -> None:
    result = invoke("chat")
    assert result.exit_code == 1
    assert "Q4_K_M is not downloaded yet" in result.stderr
    assert "localsmall pull mistral-small-3.2:Q4_K_M" in result.stderr


def test_run_offers_to_pull_then_runs_the_planned_build(hub: LocalHub, tiny) -> None:
    hub.state.add(Q4.repo, Q4.file, Path(tiny.q4_k_m).read_bytes())
    hub.state.add(Q4.repo, PROJECTOR.file, Path(tiny.mmproj).read_bytes())
    refused = invoke("run", "Hello", "--max-tokens", "2")
    assert refused.exit_code == 1
    assert "localsmall pull mistral-small-3.2:Q4_K_M` first, or pass --yes" in refused.stderr
    assert not hub.state.data_requests(Q4.file)
    ran = invoke("run", "Hello", "--yes", "--max-tokens", "3", "--temperature", "0",
                 "--threads", "2", "--json")
    assert ran.exit_code == 0, ran.output
    reply = json.loads(ran.stdout)
    assert reply["stats"]["generated_tokens"] == 3
    assert reply["stats"]["context_size"] == MODEL.default_context  # the plan's context
    assert len(hub.state.data_requests(Q4.file)) == 1
    assert not hub.state.data_requests(PROJECTOR.file)  # no image: no projector needed
    # Downloaded builds run as they are: no more requests, even offline.
    seen = len(hub.state.requests)
    again = invoke("run", "Hi", "--max-tokens", "1", "--threads", "2", "--ctx", "2048",
                   "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["stats"]["context_size"] == 2048  # --ctx wins
    assert len(hub.state.requests) == seen


def test_doctor_json_is_a_machine_to_plan_for(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    # `doctor --json` on one machine, fed to LOCALSMALL_HARDWARE on another, plans as the
    # first machine would.
    from localsmall.engine import devices
    from localsmall.plan import hardware

    seen = devices.list_devices()  # fixed, so that both readings below agree
    monkeypatch.setattr(devices, "list_devices", lambda: seen)
    monkeypatch.delenv("LOCALSMALL_HARDWARE")
    monkeypatch.setattr(hardware, "system_memory", lambda: (16 * GIB, 12 * GIB))
    laptop = invoke("doctor", "--json")
    assert laptop.exit_code == 0, laptop.output
    assert json.loads(laptop.stdout)["hardware"]["ram_total"] == 16 * GIB
    planned_there = json.loads(invoke("plan", "--json").stdout)
    snapshot = tmp_path / "laptop.json"
    snapshot.write_text(laptop.stdout)

    monkeypatch.setattr(hardware, "system_memory", lambda: (256 * GIB, 250 * GIB))
    assert json.loads(invoke("doctor", "--json").stdout)["hardware"]["ram_total"] == 256 * GIB
    monkeypatch.setenv("LOCALSMALL_HARDWARE", str(snapshot))
    described = json.loads(invoke("doctor", "--json").stdout)["hardware"]
    original = json.loads(laptop.stdout)["hardware"]
    assert (original["source"], described["source"]) == ("detected", str(snapshot))
    assert {k: v for k, v in described.items() if k != "source"} == \
        {k: v for k, v in original.items() if k != "source"}
    assert json.loads(invoke("plan", "--json").stdout) == planned_there


def test_pull_without_an_argument_pulls_the_planned_build(hub: LocalHub,
                                                          tmp_path: Path) -> None:
    # The tests' machine (CPU-only, 64 GB) plans Q4_K_M: `pull` alone fetches it and the
    # projector.
    files = {Q4.file: write_small_gguf(tmp_path / "q4.gguf", 1024 * 1024).read_bytes(),
             PROJECTOR.file: write_small_gguf(tmp_path / "p.gguf", 256 * 1024, 1).read_bytes()}
    for name, data in files.items():
        hub.state.add(Q4.repo, name, data)
    pulled = invoke("pull")
    assert pulled.exit_code == 0, pulled.output
    assert "mistral-small-3.2:Q4_K_M is ready" in pulled.stderr
    assert [len(hub.state.data_requests(name)) for name in files] == [1, 1]
    builds = json.loads(invoke("list", "--json").stdout)
    assert [(b["quant"], b["verified"], b["projector"]) for b in builds] == [
        ("Q4_K_M", "yes", True)]
