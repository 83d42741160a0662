"""What chat and run load: the plan's build, a build already on disk, a --model file;
plus the machine snapshot they plan for, and the builds `list` and `rm` see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from localsmall import paths
from localsmall.errors import ModelNotFoundError
from localsmall.hub import cache as hubcache
from localsmall.models import inventory as builds
from localsmall.models.catalog import load_catalog
from localsmall.models.registry import RegisteredBuild, register_build
from localsmall.plan import hardware
from localsmall.plan.hardware import CpuInfo, GpuDevice, Hardware
from localsmall.runtime.choose import WontFitError
from localsmall.runtime.options import RunOptions, engine_settings
from localsmall.runtime.start import prepare

GIB = 1024**3
MODEL = load_catalog().default
BIG_GPU = Hardware(gpus=(GpuDevice("CUDA0", "NVIDIA GeForce RTX 4090", "CUDA", 24 * GIB,
                                   23 * GIB),), gpu_offload=True, ram_total=64 * GIB,
                   ram_available=56 * GIB, cpu=CpuInfo("x86", 8, 16))
TOO_SMALL = Hardware(gpus=(), gpu_offload=False, ram_total=2 * GIB, ram_available=GIB // 4,
                     cpu=CpuInfo("x86", 2, 2))


def _register(tiny, quant: str) -> Path:
    """A build of `quant` made by localsmall (a copy of the tiny model in its data dir)."""
    path = paths.data_dir() / f"tiny-{quant}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny.q4_k_m, path)
    register_build(RegisteredBuild(MODEL.id, quant, str(path), str(tiny.mmproj), "test"))
    return path


def test_a_downloaded_build_runs_when_the_plans_build_is_missing(tiny) -> None:
    _register(tiny, "Q4_K_M")
    build = prepare(RunOptions(), hardware=BIG_GPU)  # the plan alone would pick Q6_K
    assert build.quant == "Q4_K_M" and build.mmproj_path == Path(tiny.mmproj)
    assert "Q6_K would suit this machine better" in build.notice
    assert build.n_gpu_layers == 3 and build.n_ctx == MODEL.default_context  # all on GPU
    settings = engine_settings(build, RunOptions(n_gpu_layers=0, n_ctx=4096))
    assert (settings.n_gpu_layers, settings.n_ctx) == (0, 4096)  # flags win


def test_missing_build_without_an_answer_names_the_pull_command() -> None:
    with pytest.raises(ModelNotFoundError, match=r"localsmall pull mistral-small-3\.2:Q6_K"):
        prepare(RunOptions(), hardware=BIG_GPU)
    offers = []
    with pytest.raises(ModelNotFoundError):
        prepare(RunOptions(quant="Q2_K"), hardware=BIG_GPU,
                offer_pull=lambda offer: offers.append(offer) or False)
    assert offers[0].ref == "mistral-small-3.2:Q2_K"
    assert [f.file for f in offers[0].files] == [MODEL.quant("Q2_K").remote.file,
                                                 MODEL.projector.remote.file]
    assert offers[0].missing == sum(f.size for f in offers[0].files)


def test_model_file_is_planned_from_its_tensor_table(tiny) -> None:
    build = prepare(RunOptions(model_path=tiny.f16), hardware=BIG_GPU)
    assert build.n_ctx == MODEL.default_context and build.n_gpu_layers == 3
    with pytest.raises(WontFitError, match=r"does not fit.*--ctx and --gpu-layers"):
        prepare(RunOptions(model_path=tiny.f16), hardware=TOO_SMALL)
    forced = prepare(RunOptions(model_path=tiny.f16, n_ctx=512, n_gpu_layers=0),
                     hardware=TOO_SMALL)
    assert forced.n_ctx is None  # the user decided: nothing planned


def test_nothing_fits_says_what_it_would_need() -> None:
    with pytest.raises(WontFitError, match="Nothing fits: the smallest build, Q2_K"):
        prepare(RunOptions(), hardware=TOO_SMALL)


def test_list_and_rm_registered_and_partial_builds(tiny) -> None:
    path = _register(tiny, "Q5_K_M")
    q2 = MODEL.quant("Q2_K").remote
    partial = hubcache.partial_path(q2.repo, "ab" * 32)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)
    hubcache.note_partial(partial, q2.file, q2.size)
    found = {(b.quant, b.source): b for b in builds.list_builds(load_catalog())}
    assert found[("Q5_K_M", "registered")].verified == "local"
    assert found[("Q2_K", "partial")].size == 1000
    assert found[("Q2_K", "partial")].total == q2.size
    assert builds.remove_build(load_catalog(), "mistral-small-3.2:Q2_K").freed == 1000
    assert not partial.exists()
    removed = builds.remove_build(load_catalog(), "mistral-small-3.2:q5_k_m")
    assert removed.freed == Path(tiny.q4_k_m).stat().st_size and not path.exists()
    assert Path(tiny.mmproj).exists()  # not made by localsmall: kept
    assert builds.list_builds(load_catalog()) == []


def test_this_machine_and_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCALSMALL_HARDWARE")  # the real machine
    here = hardware.detect()
    assert here.ram_total >= here.ram_available > 0 and here.cpu.physical_cores >= 1
    # What this llama.cpp build says, whichever backend it was built with.
    from localsmall.engine.devices import list_devices, supports_gpu_offload

    assert here.gpu_offload is supports_gpu_offload()
    gpu_names = [d.name for d in list_devices() if d.kind in ("gpu", "igpu")]
    assert [g.name for g in here.gpus] == gpu_names
    assert here.usable_gpus == (here.gpus if here.gpu_offload else ())
    snapshot = tmp_path / "machine.json"
    snapshot.write_text(json.dumps({"hardware": hardware.to_json(BIG_GPU)}))
    monkeypatch.setenv("LOCALSMALL_HARDWARE", str(snapshot))
    loaded = hardware.detect()
    assert loaded.gpus == BIG_GPU.gpus and loaded.ram_available == BIG_GPU.ram_available
    snapshot.write_text("[]")
    with pytest.raises(Exception, match="not a hardware description"):
        hardware.detect()


def test_amd_gpu_in_sysfs_is_reported_with_the_rebuild(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    card = tmp_path / "card0" / "device"
    card.mkdir(parents=True)
    (card / "vendor").write_text("0x1002\n")
    (card / "mem_info_vram_total").write_text(str(16 * GIB))
    (tmp_path / "card0-DP-1").mkdir()  # a connector, not a card
    monkeypatch.setattr(hardware, "DRM_ROOT", tmp_path)
    monkeypatch.setattr(hardware, "_run", lambda *cmd: "")
    found = hardware.unusable_gpus()
    assert [(g.vendor, g.memory_total) for g in found] == [("amd", 16 * GIB)]
    assert 'CMAKE_ARGS="-DGGML_HIP=on"' in found[0].rebuild
