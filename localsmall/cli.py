"""The `localsmall` command line: registers the commands and turns errors into one clean
line and an exit code. Each command lives in its own module under commands/."""

from __future__ import annotations

import errno
import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from localsmall import __version__
from localsmall.commands import bench as bench_cmd
from localsmall.commands import chat as chat_cmd
from localsmall.commands import convert as convert_cmd
from localsmall.commands import doctor as doctor_cmd
from localsmall.commands import list as list_cmd
from localsmall.commands import plan as plan_cmd
from localsmall.commands import pull as pull_cmd
from localsmall.commands import rm as rm_cmd
from localsmall.commands import run as run_cmd
from localsmall.commands import serve as serve_cmd
from localsmall.commands import worker as worker_cmd
from localsmall.errors import LocalsmallError


def _debug() -> bool:
    return os.environ.get("LOCALSMALL_DEBUG", "") not in ("", "0")


class LocalsmallGroup(TyperGroup):
    """Maps exceptions to messages once, for every command (and for tests, which invoke
    the app directly)."""

    def invoke(self, ctx: Any) -> Any:
        from localsmall.engine.rpc import set_reporter
        from localsmall.ui.console import error

        # A worker lost mid-reply ends the process from inside llama.cpp: same message.
        set_reporter(lambda exc: error(str(exc)))
        try:
            return super().invoke(ctx)
        except LocalsmallError as exc:
            if _debug():
                raise
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            error("interrupted")
            raise typer.Exit(130) from None
        except OSError as exc:
            if _debug():
                raise
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                error("no space left on the disk; free some space and try again")
            else:
                error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=LocalsmallGroup,
    name="localsmall",
    help="Run Mistral Small 3.2 (24B, vision + text) on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"localsmall {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Run Mistral Small 3.2 (24B, vision + text) on your own machine."""


app.command("chat")(chat_cmd.chat)
app.command("run")(run_cmd.run)
app.command("serve")(serve_cmd.serve)
app.command("plan")(plan_cmd.plan)
app.command("pull")(pull_cmd.pull)
app.command("list")(list_cmd.list_builds)
app.command("rm")(rm_cmd.rm)
app.command("convert")(convert_cmd.convert)
app.command("bench")(bench_cmd.bench)
app.command("doctor")(doctor_cmd.doctor)
app.command("worker")(worker_cmd.worker)


def main() -> None:
    """Console-script entry point."""
    app()
