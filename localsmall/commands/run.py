"""`localsmall run`: answer one prompt, streaming plain text to stdout (for scripts)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from localsmall.commands.options import RunFlags, with_run_flags
from localsmall.errors import UsageError

if TYPE_CHECKING:
    from localsmall.chat.tools import ToolSpec
    from localsmall.engine.types import Constraint
    from localsmall.models.resolve import LocalBuild


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and sys.stdin.isatty():
        raise UsageError('give a prompt (localsmall run "...") or pipe one on stdin')
    return sys.stdin.read()


@with_run_flags
def run(
    prompt: Annotated[str | None, typer.Argument(
        help="The prompt; '-' or none reads stdin.", show_default=False)] = None,
    image: Annotated[list[Path] | None, typer.Option(
        "--image", "-i", help="Image to send with the prompt (repeatable).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model-name", help="Catalog model, optionally with a quant (MODEL[:QUANT]).",
        rich_help_panel="Model")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (text and stats) instead of streaming.")] = False,
    schema: Annotated[Path | None, typer.Option(
        "--schema", help="Reply with JSON valid against this JSON schema file.",
        rich_help_panel="Structured output")] = None,
    tools_file: Annotated[Path | None, typer.Option(
        "--tools", help="Offer these tools (a JSON file of OpenAI function definitions); "
        "prints the reply's tool calls as JSON.", rich_help_panel="Structured output")] = None,
    tool_choice: Annotated[str | None, typer.Option(
        "--tool-choice", help="auto (default), required, none, or a function name.",
        rich_help_panel="Structured output")] = None,
    *,
    flags: RunFlags,
) -> None:
    """Answer one prompt (with optional images) and exit."""
    from localsmall.chat.structured import read_tool_reply
    from localsmall.commands.starting import started_session
    from localsmall.ui.console import notice, print_json, stdout_write

    images = image or []
    if images and flags.no_vision:
        raise UsageError("--image needs vision; drop --no-vision")
    text = _read_prompt(prompt)
    if not text.strip() and not images:
        raise UsageError("the prompt is empty")
    tools, constraint = _structured(schema, tools_file, tool_choice)  # checked before loading
    # The projector is loaded only when there are images to read.
    options = flags.run_options(model, vision=bool(images))

    def needs_projector(build: LocalBuild) -> None:
        if images and build.mmproj_path is None:
            raise UsageError(f"--image needs a vision projector. {build.notice}")

    talk = flags.session_options()  # checks --image-tokens before anything loads
    with started_session(options, talk, yes=flags.yes,
                         check=needs_projector) as (session, build, progress):
        if problem := session.system_notice():
            notice(problem)
        session.tools = tools
        session.sampling = dataclasses.replace(session.sampling, constraint=constraint)
        for path in images:
            session.attach(str(path))
        reply = session.ask(text)
        for attached in reply.images:
            if note := session.cost_note(attached, explicit=flags.image_tokens is not None):
                notice(note)
        if tools:
            calls = read_tool_reply(reply.pieces(progress)).to_json()
            progress.stop()
            if reply.stats.stop_reason == "interrupted":
                raise KeyboardInterrupt  # no half a tool call on stdout: exit 130
            if as_json:
                calls |= {"model": build.label, "stats": reply.stats.to_json()}
            print_json(calls, one_line=True)
            return
        streamed = False
        for piece in reply.stream(progress):
            if not streamed:
                progress.stop()
                streamed = True
            if not as_json:
                stdout_write(piece)
        progress.stop()
        if reply.stats.stop_reason == "interrupted":
            raise KeyboardInterrupt  # Ctrl-C during a token: exit 130 like anywhere else
        if as_json:
            sized = [{"source": i.source, "width": i.width, "height": i.height,
                      "tokens": i.n_tokens, "full_tokens": i.full_tokens}
                     for i in reply.images]
            print_json({"model": build.label, "text": reply.text,
                        "stats": reply.stats.to_json(), "images": sized}, one_line=True)
        else:
            stdout_write("\n")


def _structured(schema: Path | None, tools_file: Path | None,
                tool_choice: str | None) -> tuple[tuple[ToolSpec, ...], Constraint | None]:
    """The tools to offer and the constraint for --schema / --tools / --tool-choice."""
    from localsmall.chat.structured import load_schema_file, load_tools_file
    from localsmall.chat.tools import parse_tool_choice, reply_constraint

    if tool_choice is not None and tools_file is None:
        raise UsageError("--tool-choice needs --tools")
    tools = load_tools_file(tools_file) if tools_file is not None else ()
    response_format = load_schema_file(schema) if schema is not None else None
    choice = parse_tool_choice(tool_choice, tools) if tools else None
    return tools, reply_constraint(tools=tools, tool_choice=choice,
                                   response_format=response_format)
