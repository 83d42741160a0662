"""`localsmall run` and the CLI's error handling, through Typer's runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def _run_json(*args: str, stdin: str | None = None) -> dict:
    result = runner.invoke(app, ["run", *args, "--json"], input=stdin)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def borrowed_engine(engine, monkeypatch):
    """`run` answers with the session's engine instead of loading the model again (the
    same tiny model; flags that change how the model is loaded have no effect)."""
    from localsmall.runtime import start

    class Borrowed:
        """The engine, except that leaving `with` does not close it."""

        def __getattr__(self, name: str) -> object:
            return getattr(engine, name)

        def __enter__(self):
            engine.reset()
            return self

        def __exit__(self, *exc: object) -> None:
            engine.reset()

    monkeypatch.setattr(start, "load_engine", lambda *args, **kwargs: Borrowed())
    return engine


def test_run_streams_the_answer_token_by_token(tiny, monkeypatch) -> None:
    # Every piece reaches stdout by itself, flushed as it is generated: one write per
    # token (then the final newline), not the whole reply at the end.
    from localsmall.ui import console

    expected = _run_json("Say hi", *_model_flags(tiny, vision=False), "-n", "4",
                         "--temperature", "0", "--no-system")
    assert expected["stats"]["generated_tokens"] == 4
    writes: list[str] = []
    monkeypatch.setattr(console, "stdout_write", writes.append)
    result = runner.invoke(app, ["run", "Say hi", *_model_flags(tiny), "-n", "4",
                                 "--temperature", "0", "--no-system"])
    assert result.exit_code == 0, result.output
    assert len(writes) == 4 + 1 and writes[-1] == "\n"
    assert all(piece for piece in writes[:-1])
    assert "".join(writes[:-1]) == expected["text"]


def test_run_reads_the_prompt_from_stdin_and_prints_json(tiny, borrowed_engine) -> None:
    flags = [*_model_flags(tiny, vision=False), "-n", "3", "--temperature", "0", "--no-system"]
    piped = _run_json(*flags, stdin="What is 2+2?")
    dashed = _run_json("-", *flags, stdin="What is 2+2?")
    argument = _run_json("What is 2+2?", *flags)
    assert piped["stats"]["generated_tokens"] == 3
    assert piped["stats"]["stop_reason"] == "length"
    # The piped text is the prompt: the same prompt tokens and reply as the argument,
    # and another piped text makes another prompt.
    for data in (piped, dashed):
        assert data["text"] == argument["text"] and data["text"]
        assert data["stats"]["prompt_tokens"] == argument["stats"]["prompt_tokens"]
    other = _run_json(*flags, stdin="What is 2+2? Answer with one word, please.")
    assert other["stats"]["prompt_tokens"] > argument["stats"]["prompt_tokens"]


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


def _localsmall(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m localsmall ...` in a new process, with this checkout's code."""
    root = Path(__file__).resolve().parent.parent
    environ = dict(os.environ, **env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root),
                                                          environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "localsmall", *args], env=environ, cwd=root,
                          capture_output=True, text=True, timeout=120)


def test_debug_shows_the_traceback() -> None:
    quiet = _localsmall("run", "Hello", "--quant", "Q5_K_M")
    assert quiet.returncode == 1
    assert quiet.stderr.startswith("error:") and "Traceback" not in quiet.stderr
    debug = _localsmall("run", "Hello", "--quant", "Q5_K_M", LOCALSMALL_DEBUG="1")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ModelNotFoundError" in debug.stderr and "localsmall pull" in debug.stderr


def test_help_does_not_load_llama_cpp() -> None:
    # What keeps --help instant, in a fresh process: importing the CLI loads neither
    # llama.cpp nor the Markdown renderer, and showing the help of the app and of its
    # commands loads neither llama.cpp nor numpy nor Pillow.
    code = ("import sys\n"
            "from localsmall.cli import app\n"
            "assert not {'llama_cpp', 'rich.markdown'} & set(sys.modules)\n"
            "for args in (['--help'], ['chat', '--help'], ['run', '--help'], "
            "['bench', '--help'], ['convert', '--help']):\n"
            "    try:\n"
            "        app(args)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, (args, exc.code)\n"
            "heavy = {'llama_cpp', 'numpy', 'PIL.Image'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout and "--model" in done.stdout


def test_image_without_projector_is_refused_before_loading(tiny, make_image) -> None:
    picture = make_image("pic.png")
    result = runner.invoke(app, ["run", "x", "--image", str(picture), "--model", str(tiny.f16)])
    assert result.exit_code == 2
    assert "needs a vision projector" in result.stderr and "--mmproj" in result.stderr


# --- sampling and prompt flags reach the model ------------------------------------------


def _reply(tiny, *flags: str) -> str:
    return _run_json("Tell me something", *_model_flags(tiny, vision=False), "-n", "4",
                     "--no-system", *flags)["text"]


def test_seed_top_k_and_top_p_reach_the_sampler(tiny, borrowed_engine) -> None:
    greedy = _reply(tiny, "--temperature", "0")
    hot = ["--temperature", "3"]
    seeded = _reply(tiny, *hot, "--seed", "7")
    # The same seed gives the same reply at a temperature above 0; another seed does not.
    assert _reply(tiny, *hot, "--seed", "7") == seeded
    assert _reply(tiny, *hot, "--seed", "8") != seeded
    assert seeded != greedy
    # Keeping only the most likely token (top-k 1), or a nucleus so small it holds only
    # that token, is greedy decoding whatever the temperature and seed.
    assert _reply(tiny, *hot, "--seed", "7", "--top-k", "1") == greedy
    assert _reply(tiny, *hot, "--seed", "7", "--top-p", "0.000001") == greedy


def test_system_and_no_system(tiny, borrowed_engine) -> None:
    engine = borrowed_engine

    def prompt_tokens(*flags: str) -> int:
        return _run_json("Hi", *_model_flags(tiny, vision=False), "-n", "1",
                         "--temperature", "0", *flags)["stats"]["prompt_tokens"]

    bare = prompt_tokens("--no-system")
    # <s>[INST]Hi[/INST]: nothing else is sent
    assert bare == len(engine.tokenize("<s>[INST]", special=True)) + len(
        engine.tokenize("Hi", special=False)) + 1
    # [SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT] is added, exactly
    custom = prompt_tokens("--system", "Be brief.")
    assert custom - bare == 2 + len(engine.tokenize("Be brief.", special=False))
    # by default, Mistral's own system prompt (hundreds of tokens)
    assert prompt_tokens() - bare > 100
    assert prompt_tokens("--system", "Be brief.", "--no-system") == bare


@pytest.mark.parametrize(("flag", "state"), [("--flash-attn", "enabled"),
                                             ("--no-flash-attn", "disabled")])
def test_flash_attention_flag_reaches_llama_cpp(tiny, flag: str, state: str) -> None:
    from localsmall.engine import native

    with native.capture_log() as lines:
        data = _run_json("Hi", *_model_flags(tiny, vision=False), "-n", "1", "--temperature",
                         "0", "--no-system", flag)
    assert data["stats"]["generated_tokens"] == 1
    settings = [line for line in lines if "flash_attn" in line and "=" in line]
    assert settings and all(line.split("=")[-1].strip() == state for line in settings), settings


def test_a_gguf_without_a_chat_template_runs_with_the_built_in_one(tiny) -> None:
    # The same weights with and without tokenizer.chat_template: the built-in Mistral
    # Small 3.2 template makes the same prompt, so the same greedy reply.
    flags = ["-n", "4", "--temperature", "0", "--ctx", "2048", "--threads", "2",
             "--system", "Be brief."]
    bare = _run_json("What is the capital of France?", "--model", str(tiny.no_template),
                     *flags)
    with_template = _run_json("What is the capital of France?", "--model", str(tiny.f16),
                              *flags)
    assert bare["stats"]["prompt_tokens"] == with_template["stats"]["prompt_tokens"]
    assert bare["text"] == with_template["text"] and bare["stats"]["generated_tokens"] == 4
    from localsmall.gguf_header import read_header

    assert "tokenizer.chat_template" not in read_header(tiny.no_template).metadata
    assert "tokenizer.chat_template" in read_header(tiny.f16).metadata
