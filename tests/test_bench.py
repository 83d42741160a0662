"""`localsmall bench` on tiny models through the real llama.cpp: the timed loops, the
result formats, sweeps, quality against a reference, and clear errors for bad flags."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localsmall.cli import app
from localsmall.engine.model import Engine
from localsmall.engine.types import SamplingSettings, TokenRun
from tests import tinymodels as tm

runner = CliRunner()
SMALL = ["-p", "16", "-n", "4", "-r", "1"]


def bench(*args: str | Path) -> list[str]:
    result = runner.invoke(app, ["bench", *(str(a) for a in args)])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def _oneline(text: str) -> str:
    """Error text with the console's line wrapping undone."""
    return " ".join(text.split())


def bench_json(*args: str | Path) -> dict:
    result = runner.invoke(app, ["bench", *(str(a) for a in args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def q8_0(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.quantize(tiny.f16, tmp_path_factory.mktemp("q8") / "tiny-Q8_0.gguf", "Q8_0")


# --- the timed loops ----------------------------------------------------------------------


def test_timer_passes_fill_the_cache_like_llama_bench(engine: Engine) -> None:
    from localsmall.engine.timing import DecodeTimer

    with DecodeTimer(engine) as timer:
        decoded: list[int] = []
        decode = timer._decode
        timer._decode = lambda tokens, pos: decoded.append(len(tokens)) or decode(tokens, pos)
        timer.prefill(20)
        assert timer._next_pos() == 20 and sum(decoded) == 20
        assert timer.prompt(10) > 0
        assert timer._next_pos() == 30
        assert timer.generate(3) > 0
        assert timer._next_pos() == 33
        timer.clear()
        assert timer._next_pos() == 0
        decoded.clear()
        timer.prefill(20)  # restored from the saved state, not recomputed
        assert timer._next_pos() == 20 and decoded == []
        assert timer.generate(1) > 0 and decoded == [1]
    assert engine.cached_positions == 0


def test_chunk_logits_are_the_models_next_token_logits(engine: Engine) -> None:
    from localsmall.engine.logits import chunk_logits

    ids = engine.tokenize("<s>[INST]Name three rivers in Europe.[/INST]", special=True)
    logits = chunk_logits(engine, ids, len(ids) - 4)
    assert logits.shape == (4, engine.info.n_vocab)
    greedy = engine.generate([TokenRun(tuple(ids))],
                             SamplingSettings(temperature=0, max_tokens=1)).run()
    engine.reset()
    assert int(logits[-1].argmax()) == greedy.token_ids[0]


# --- speed through the CLI -------------------------------------------------------------------


def test_speed_report_as_json(tiny) -> None:
    data = bench_json("--model", tiny.f16, "--mmproj", tiny.mmproj, "-p", "32", "-n", "8",
                      "-r", "2", "--depth", "16", "--threads", "2")
    assert data["format"] == "localsmall-bench/1"
    system = data["system"]
    assert system["cpu_model"] and system["physical_cores"] >= 1 and system["ram_bytes"] > 0
    assert "CPU" in system["backends"] and "ggml" in system["llama_cpp"]
    assert system["localsmall_version"]
    (row,) = data["speed"]
    assert (row["threads"], row["depth"], row["n_prompt"], row["n_gen"]) == (2, 16, 32, 8)
    for key in ("pp", "tg"):
        m = row[key]
        assert len(m["samples"]) == 2 and all(math.isfinite(s) and s > 0 for s in m["samples"])
        assert m["mean"] == pytest.approx(sum(m["samples"]) / 2) and m["stdev"] >= 0
    assert row["load_s"] > 0 and row["peak_rss_bytes"] > row["size_bytes"] / 2
    # time to first token on the real chat prompt: Mistral's system prompt + a question
    assert row["ttft"]["mean"] > 0 and row["ttft_tokens"] > 400
    assert row["image_encode"]["mean"] > 0 and row["image_tokens"] == 18 * 18 + 17
    # an image turn, split like the chat's status line: encoding + reading <= first token
    assert row["image_read"]["mean"] > 0
    assert row["image_encode"]["mean"] + row["image_read"]["mean"] <= row["image_ttft"]["mean"]
    # GPU memory is reported where this build sees a GPU, and only there
    from localsmall.bench.system import GPU_KINDS
    from localsmall.engine.devices import list_devices

    if any(d.kind in GPU_KINDS for d in list_devices()):
        assert isinstance(row["device_memory_bytes"], int) and row["device_memory_bytes"] >= 0
    else:
        assert row["device_memory_bytes"] is None


def test_sweep_runs_every_combination(tiny) -> None:
    lines = bench("--model", tiny.f16, *SMALL, "--threads", "1,2", "--kv-type", "f16,q8_0",
                  "--csv")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    assert lines[0].startswith("name,model,quant,file,size_bytes")
    assert "cpu_model" in rows[0] and "llama_cpp" in rows[0]
    assert sorted((r["threads"], r["kv_type"]) for r in rows) == [
        ("1", "f16"), ("1", "q8_0"), ("2", "f16"), ("2", "q8_0")]
    assert all(float(r["pp_tps"]) > 0 and float(r["tg_tps"]) > 0 for r in rows)


def test_compare_writes_a_markdown_table(tiny, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    shown = "\n".join(bench("--model", tiny.q4_k_m, "--model", tiny.f16, *SMALL, "--compare",
                            "--out", out, "--no-vision"))
    assert "localsmall bench" in shown  # the table is still shown
    text = out.read_text(encoding="utf-8")
    assert "- **CPU**:" in text and "- **llama.cpp**:" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:2] == ["model", "size"] and "pp× / tg×" in header
    assert set(table[1].replace("|", "").split()) <= {"---", "---:"}
    names = [row.split("|")[1].strip() for row in table[2:]]
    assert names == ["tiny-F16.gguf", "tiny-Q4_K_M.gguf"]  # largest file first
    assert table[2].split("|")[header.index("pp× / tg×") + 1].strip() == "1.00 / 1.00"
    # the smaller file's speeds relative to the largest one's, from the same runs
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:4]]
    pp, tg = (next(i for i, h in enumerate(header) if h.startswith(p)) for p in ("pp", "tg"))
    ratio = [float(x) for x in cells[1][header.index("pp× / tg×")].split(" / ")]
    for got, column in zip(ratio, (pp, tg), strict=True):
        expected = float(cells[1][column].split()[0]) / float(cells[0][column].split()[0])
        # the cells are rounded for display: a large ratio differs from theirs by ~0.1%
        assert got == pytest.approx(expected, rel=0.01, abs=0.011), (got, expected)


# --- quality -------------------------------------------------------------------------------


def test_quality_against_a_reference(tiny, q8_0: Path, tmp_path: Path,
                                     isolated_home: Path) -> None:
    same = tmp_path / "copy-of-F16.gguf"
    shutil.copyfile(tiny.f16, same)
    data = bench_json("--model", same, "--model", q8_0, "--model", tiny.q4_k_m,
                      "--reference", tiny.f16, "--quality", "--quick", "-p", "0", "-n", "0")
    assert data["speed"] == []
    ref, itself, q8, q4 = data["quality"]
    assert ref["is_reference"] and ref["name"] == "tiny-F16.gguf" and ref["kld"] is None
    assert all(q["tokens"] == 2 * 255 and q["reference"] == "tiny-F16.gguf"
               for q in data["quality"])
    assert all(math.isfinite(q["ppl"]) and q["ppl"] > 1 for q in data["quality"])
    # the same weights in another file: nothing lost (see test_bench_stats for why the
    # divergence is rounding-sized rather than exactly 0)
    assert abs(itself["kld"]) < 1e-5 and itself["same_top"] == 1.0
    assert itself["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    # 4-bit weights lose far more than 8-bit ones: the divergence grows with the square
    # of the weight error (~16x larger for Q4_K than Q8_0), far beyond the noise
    assert 0 < q8["kld"] < q4["kld"] / 10
    assert q4["same_top"] + 5 * q4["same_top_error"] < q8["same_top"]

    # The reference's log-probs are cached: a later run reads them back.
    (cached,) = (isolated_home / "localsmall" / "cache" / "bench").glob("kld-reference-*")
    written = cached.stat().st_mtime_ns
    again = bench_json("--model", tiny.q4_k_m, "--reference", tiny.f16, "--quality",
                       "--quick", "-p", "0", "-n", "0")
    assert again["quality"][1]["kld"] == pytest.approx(q4["kld"], rel=1e-9)
    assert cached.stat().st_mtime_ns == written


# --- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code", "message"), [
    (["-p", "-1"], 2, "-p/--n-prompt must be 0 or more"),
    (["-r", "0"], 2, "-r/--repetitions must be at least 1"),
    (["-p", "0", "-n", "0"], 2, "nothing to measure"),
    (["--json", "--csv"], 2, "--json, --csv and --md are exclusive"),
    (["--compare"], 2, "--compare needs two or more builds"),
    (["--threads", "0"], 2, "--threads values must be at least 1"),
    (["--threads", "two"], 2, "not a comma-separated list of numbers"),
    (["--threads", "1,,2"], 2, "give comma-separated values"),
    (["--kv-type", "f16,q5_1"], 2, "--kv-type values must be among"),
    (["--gpu-layers", "-2"], 2, "--gpu-layers values must be -1 (all) or more"),
    (["--text", "eval.txt"], 2, "--text and --reference go with --quality"),
    (["--out", "results.txt"], 2, "cannot tell the format"),
    (["--quant", "Q4_K_M"], 2, "--quant picks catalog builds"),
    (["--image", "cat.png", "--no-vision"], 2, "--image needs vision"),
    (["--ctx", "256", "--depth", "300"], 2, "--ctx 256 is too small"),
])
def test_bad_flags_are_refused_before_loading(tiny, args: list[str], code: int,
                                              message: str) -> None:
    result = runner.invoke(app, ["bench", "--model", str(tiny.f16), *args])
    assert result.exit_code == code
    assert message in _oneline(result.stderr) and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--quant", "Q9_X"], "has no quant 'Q9_X'"),
    (["--quant", "Q8_0"], "run `localsmall pull mistral-small-3.2:Q8_0`"),
    (["--model", "missing.gguf"], "model file not found"),
])
def test_missing_builds_say_what_to_do(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 1
    assert message in _oneline(result.stderr)


def test_image_needs_a_projector_and_text_needs_enough_tokens(tiny, make_image,
                                                              tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--model", str(tiny.f16), "--image",
                                 str(make_image("a.png"))])
    assert result.exit_code == 2
    assert "--image needs a vision projector" in _oneline(result.stderr)
    short = tmp_path / "short.txt"
    short.write_text("Too short to score.", encoding="utf-8")
    result = runner.invoke(app, ["bench", "--model", str(tiny.q4_k_m), "--reference",
                                 str(tiny.f16), "--quality", "--text", str(short),
                                 "-p", "0", "-n", "0"])
    assert result.exit_code == 2 and "--quality needs at least 512" in _oneline(result.stderr)


def test_progress_renders_steps_and_model_loading() -> None:
    from rich.console import Console

    from localsmall.bench.types import BenchStep
    from localsmall.engine.types import Progress
    from localsmall.ui.bench_view import BenchProgress

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    # The display is drawn a last time when it stops: what it shows then is checked.
    with BenchProgress(console, enabled=True) as progress:
        progress(BenchStep(0, 10, "[1/2] Q4_K_M: loading the model"))
        progress(Progress("load", 500, 1000, "loading model"))
    loading = screen.getvalue()
    assert "Q4_K_M: loading the model" in loading and "0/10" in loading
    assert "  loading" in loading and "500/1000" in loading  # the model's own load bar
    with BenchProgress(console, enabled=True) as progress:
        progress(BenchStep(0, 10, "[1/2] Q4_K_M: loading the model"))
        progress(Progress("load", 500, 1000, "loading model"))
        progress(BenchStep(3, 10, "[1/2] Q4_K_M: pp512 run 2/5"))
    assert "pp512 run 2/5" in screen.getvalue()[len(loading):]
    assert "3/10" in screen.getvalue()[len(loading):]


# --- catalog builds: what `bench` picks by itself -------------------------------------------


def _register(quant: str, model: Path, mmproj: Path | None) -> None:
    from localsmall.models.catalog import load_catalog
    from localsmall.models.registry import RegisteredBuild, register_build

    register_build(RegisteredBuild(load_catalog().default.id, quant, str(model),
                                   str(mmproj) if mmproj else None, "test"))


def test_without_arguments_bench_measures_the_build_chat_would_run(tiny, monkeypatch
                                                                   ) -> None:
    _register("Q4_K_M", tiny.q4_k_m, tiny.mmproj)  # the plan's pick on the tests' machine
    # The defaults, llama-bench's: pp512, tg128, 5 repetitions of the planned build.
    from localsmall.bench import runner

    requests = []
    real_run = runner.run_bench
    with monkeypatch.context() as quick:  # what would be measured, without the hour
        quick.setattr(runner, "run_bench", lambda request, **kw: requests.append(request)
                      or real_run(replace(request, n_prompt=16, n_gen=4, repetitions=1),
                                  **kw))
        data = bench_json()
    (request,) = requests
    assert (request.n_prompt, request.n_gen, request.repetitions) == (512, 128, 5)
    assert [(t.ref, t.quant, t.model_path) for t in request.targets] == [(None, None, None)]
    (row,) = data["speed"]
    assert row["quant"] == "Q4_K_M" and row["file"] == str(tiny.q4_k_m)
    assert row["image_tokens"] > 0  # the projector came with the build


def test_quality_picks_the_best_build_on_disk_and_reads_a_text_file(
        tiny, q8_0: Path, engine: Engine, tmp_path: Path) -> None:
    from localsmall.engine.logits import text_tokens

    _register("Q4_K_M", tiny.q4_k_m, None)
    _register("Q8_0", q8_0, None)
    text = tmp_path / "my-eval.txt"
    text.write_text(" ".join(f"Sentence {i} says something about rivers and hills."
                             for i in range(60)), encoding="utf-8")
    n_tokens = len(text_tokens(engine, text.read_text(encoding="utf-8")))
    assert 512 <= n_tokens < 1024  # exactly one chunk of 512
    data = bench_json("--quant", "Q4_K_M", "--quality", "--text", text, "-p", "0", "-n", "0")
    assert data["quality_text"] == "my-eval.txt"
    ref, q4 = data["quality"]
    # Not asked for, but on disk: Q8_0 is the highest-precision build, so the reference.
    assert ref["is_reference"] and ref["file"] == str(q8_0) and ref["quant"] == "Q8_0"
    assert q4["file"] == str(tiny.q4_k_m) and q4["reference"] == q8_0.name
    assert (q4["chunks"], q4["tokens"]) == (1, 255) and q4["kld"] > 0
