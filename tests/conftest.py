"""Shared fixtures: an isolated user environment for every test, and tiny models built
once per test session (real llama.cpp, random weights, the real tekken vocabulary)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tinymodels as tm
from tests.tinymodels import image_bytes


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background by a non-interactive shell (`make test &`, some
    CI runners) inherits SIGINT ignored, and every process it starts would ignore Ctrl-C
    too, so the tests that interrupt a child would wait in vain: give Ctrl-C its default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    """User directories and the Hugging Face cache in a temporary folder, the Hub
    unreachable unless a test points HF_ENDPOINT at its own local server, and a fixed
    simulated machine to plan for (LOCALSMALL_HARDWARE)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LOCALSMALL_HOME", str(home / "localsmall"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("LOCALSMALL_DEBUG", raising=False)
    # No test times this machine's kernels at full size by accident (tests/test_speed.py
    # calibrates at a narrow shape on purpose).
    monkeypatch.setenv("LOCALSMALL_CALIBRATE", "0")
    # huggingface_hub reads these variables once, at import: mirror them.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(home / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # Plans must not depend on the machine running the tests: a CPU-only 64 GB one.
    machine = home / "machine.json"
    machine.write_text(json.dumps(TEST_MACHINE))
    monkeypatch.setenv("LOCALSMALL_HARDWARE", str(machine))
    return home


GIB = 1024**3
TEST_MACHINE = {"gpus": [], "gpu_offload": False, "ram_total": 64 * GIB,
                "ram_available": 58 * GIB,
                "cpu": {"model": "test CPU", "physical_cores": 8, "logical_cores": 16}}


@dataclass(frozen=True)
class TinyModels:
    """The tiny models of this test session."""

    f16: Path          # text model, F16 matrices, with the built-in chat template
    q4_k_m: Path       # quantized with llama.cpp's quantizer
    no_template: Path  # F16 without tokenizer.chat_template
    mmproj: Path       # Pixtral projector matched to the text model
    tekken: Path       # a v11 tekken.json (for mistral-common)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny-models")
    tensors = tm.text_tensors(tm.TINY_TEXT)
    template = tm.builtin_template()
    f16 = tm.write_text_model(root / "tiny-F16.gguf", chat_template=template, tensors=tensors)
    bare = tm.write_text_model(root / "tiny-notemplate-F16.gguf", tensors=tensors)
    mmproj = tm.write_mmproj(root / "mmproj-tiny-F32.gguf", tensors)
    q4 = tm.quantize(f16, root / "tiny-Q4_K_M.gguf", "Q4_K_M")
    tekken = tm.write_v11_tekken(root / "tekken.json")
    return TinyModels(f16=f16, q4_k_m=q4, no_template=bare, mmproj=mmproj,
                      tekken=tekken)


@pytest.fixture(scope="session")
def session_engine(tiny: TinyModels) -> Iterator[object]:
    """A loaded tiny model with its projector, shared by the whole session; tests use it
    through `engine`, which hands it over clean."""
    from localsmall.engine.model import Engine
    from localsmall.engine.types import EngineSettings

    with Engine(EngineSettings(model_path=tiny.f16, mmproj_path=tiny.mmproj, n_ctx=4096,
                               n_threads=2)) as loaded:
        yield loaded


@pytest.fixture
def engine(session_engine: object) -> object:
    """The session's engine with an empty KV cache and no remembered image embeddings,
    so a test's counts (tokens reused, images encoded) depend on that test alone."""
    session_engine.reset()  # type: ignore[attr-defined]
    projector = session_engine.projector  # type: ignore[attr-defined]
    assert projector is not None
    projector.forget()
    assert not projector._embeddings
    return session_engine


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a test image: make_image("a.png", 112, 84, fmt="PNG")."""

    def make(name: str, width: int = 112, height: int = 84, **kwargs: object) -> Path:
        path = tmp_path / name
        path.write_bytes(image_bytes(width, height, **kwargs))  # type: ignore[arg-type]
        return path

    return make


@dataclass
class LocalHub:
    """A Hub on 127.0.0.1 that huggingface_hub and localsmall talk to in this test."""

    url: str
    state: object  # tests.hubserver.HubState


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """Serve the Hub protocol locally and point HF_ENDPOINT at it, online.
    huggingface_hub reads HF_HUB_OFFLINE once at import, so its constant follows too."""
    import huggingface_hub.constants as hf_constants

    from tests.hubserver import running_hub

    with running_hub() as (url, state):
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        yield LocalHub(url, state)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, for localsmall and for huggingface_hub."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After a run with fuzz tests: each target's cases, failures and longest case."""
    import sys

    fuzzing = sys.modules.get("tests.fuzzing")
    logs = getattr(fuzzing, "LOGS", None)
    if not logs:
        return
    terminalreporter.section("fuzz targets")
    terminalreporter.write_line(f"{'target':<26} {'cases':>8} {'failures':>9} "
                                f"{'longest case':>13}")
    for target, log in sorted(logs.items()):
        terminalreporter.write_line(f"{target:<26} {log.cases:>8} {log.failures:>9} "
                                    f"{log.longest_s * 1000:>10.1f} ms")
