"""`localsmall run` and the CLI's error handling, through Typer's runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.models.catalog import load_catalog

runner = CliRunner()


def _model_flags(tiny, vision: bool = True) -> list[str]:
    flags = ["--model", str(tiny.f16), "--ctx", "2048", "--threads", "2"]
    return flags + (["--mmproj", str(tiny.mmproj)] if vision else [])


def seed_hf_cache(hf_home: Path, repo: str, filename: str, source: Path) -> Path:
    """Put a file into the Hugging Face cache layout, as a finished download leaves it."""
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    target = folder / "snapshots" / revision / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)
    return target


def test_run_streams_an_answer(tiny) -> None:
    result = runner.invoke(app, ["run", "Say hi", *_model_flags(tiny), "-n", "6",
                                 "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_run_reads_stdin_and_prints_json(tiny) -> None:
    result = runner.invoke(app, ["run", "--json", *_model_flags(tiny, vision=False), "-n", "5",
                                 "--temperature", "0"], input="What is 2+2?\n")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["stats"]["generated_tokens"] == 5
    assert data["stats"]["stop_reason"] == "length"
    assert data["text"]


def test_run_with_images(tiny, make_image) -> None:
    picture = make_image("pic.png")
    result = runner.invoke(app, ["run", "Describe it", "--image", str(picture), "--json",
                                 *_model_flags(tiny), "-n", "4", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["images_encoded"] == 1


def test_run_with_a_bad_image_fails_cleanly(tiny, tmp_path: Path) -> None:
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = runner.invoke(app, ["run", "x", "--image", str(fake), *_model_flags(tiny)])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "Traceback" not in result.output
    assert "fake.jpg" in result.stderr


def test_catalog_model_from_the_hf_cache(tiny, isolated_home: Path) -> None:
    model = load_catalog().default
    quant = model.quant("Q4_K_M")
    seed_hf_cache(isolated_home / "hf", quant.remote.repo, quant.remote.file, tiny.q4_k_m)
    seed_hf_cache(isolated_home / "hf", model.projector.remote.repo,
                  model.projector.remote.file, tiny.mmproj)
    result = runner.invoke(app, ["run", "Hello", "--json", "--ctx", "1024", "-n", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == f"{model.name} Q4_K_M"


def test_missing_model_says_what_to_pull() -> None:
    result = runner.invoke(app, ["run", "Hello", "--quant", "Q5_K_M"])
    assert result.exit_code == 1
    assert "localsmall pull mistral-small-3.2:Q5_K_M" in result.stderr


def test_bad_flags_are_usage_errors(tiny) -> None:
    cases = [
        ["run", "x", "--kv-type", "q3"],
        ["run", "x", *_model_flags(tiny), "--ctx", "10"],
        ["run", "x", "--temperature", "-1", *_model_flags(tiny)],
        ["run", "x", "--image", "a.png", "--no-vision", *_model_flags(tiny)],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error:")
    unknown = runner.invoke(app, ["run", "x", "--quant", "Q9_Z"])
    assert unknown.exit_code == 1 and "no quant 'Q9_Z'" in unknown.stderr


def test_debug_shows_the_traceback(monkeypatch) -> None:
    monkeypatch.setenv("LOCALSMALL_DEBUG", "1")
    result = runner.invoke(app, ["run", "Hello", "--quant", "Q5_K_M"])
    assert result.exit_code != 0 and result.exception is not None


def test_help_is_instant_and_does_not_load_llama_cpp() -> None:
    code = ("import sys, localsmall.cli; "
            "assert 'llama_cpp' not in sys.modules and 'rich.markdown' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "localsmall", "--help"], env=env,
                          capture_output=True, text=True, check=True)
    assert "chat" in done.stdout and "run" in done.stdout


def test_image_without_projector_is_refused_before_loading(tiny, make_image) -> None:
    picture = make_image("pic.png")
    result = runner.invoke(app, ["run", "x", "--image", str(picture), "--model", str(tiny.f16)])
    assert result.exit_code == 2
    assert "needs a vision projector" in result.stderr and "--mmproj" in result.stderr
