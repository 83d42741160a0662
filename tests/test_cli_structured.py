"""`localsmall run --schema` and `run --tools`: JSON that validates, tool calls as JSON,
one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from localsmall.cli import app

runner = CliRunner()
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0,
                                                 "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"]}}}]


def _flags(tiny) -> list[str]:
    return ["--model", str(tiny.f16), "--ctx", "1024", "--threads", "2", "--seed", "1",
            "-n", "40"]


def _write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_run_with_schema_prints_valid_json(tiny, tmp_path: Path) -> None:
    schema = _write(tmp_path, "schema.json", SCHEMA)
    result = runner.invoke(app, ["run", "Is it ok?", "--schema", str(schema), *_flags(tiny)])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


def test_run_with_required_tools_prints_the_calls(tiny, tmp_path: Path) -> None:
    tools = _write(tmp_path, "tools.json", TOOLS)
    result = runner.invoke(app, ["run", "Temperature?", "--tools", str(tools),
                                 "--tool-choice", "lookup", *_flags(tiny)])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    (call,) = reply["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "lookup"
    assert len(call["id"]) == 9
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        TOOLS[0]["function"]["parameters"])  # type: ignore[index]


def test_bad_files_are_one_line_errors(tiny, tmp_path: Path) -> None:
    cases = [
        (["--schema", str(_write(tmp_path, "a.json", "{not json"))], "not valid JSON"),
        (["--schema", str(_write(tmp_path, "b.json", {"type": "string", "pattern": "x+"}))],
         "'pattern' cannot be enforced"),
        (["--tools", str(_write(tmp_path, "c.json", [{"type": "function"}]))], "function"),
        (["--tools", str(tmp_path / "missing.json")], "could not be read"),
        (["--tools", str(_write(tmp_path, "d.json", TOOLS)), "--tool-choice", "nope"],
         "not among the tools"),
        (["--tool-choice", "required"], "--tool-choice needs --tools"),
    ]
    for flags, message in cases:
        result = runner.invoke(app, ["run", "hi", *flags, *_flags(tiny)])
        assert result.exit_code == 2, (flags, result.output)
        text = " ".join(result.output.split())  # the console wraps long lines
        assert text.startswith("error:") and text.count("error:") == 1, result.output
        assert message in text and "Traceback" not in text
