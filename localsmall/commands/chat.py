"""`localsmall chat`: the interactive chat."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from localsmall.commands.options import ModelArg, RunFlags, with_run_flags

if TYPE_CHECKING:
    from localsmall.chat.session import ChatSession
    from localsmall.models.resolve import LocalBuild
    from localsmall.ui.chat_screen import ChatHeader


def header_for(session: ChatSession, build: LocalBuild) -> ChatHeader:
    """The banner: what runs, where, with how much context, how images are sized."""
    from localsmall.ui.chat_screen import ChatHeader
    from localsmall.units import gib_fixed

    engine = session.engine
    info = engine.info
    where = (f"GPU ({info.n_gpu_layers} layers offloaded)" if info.n_gpu_layers
             else f"CPU, {engine.n_threads} threads")
    if engine.remote_devices:
        workers = ", ".join(dict.fromkeys(d.endpoint for d in engine.remote_devices))
        where = f"CPU + workers {workers} ({info.n_gpu_layers} of {info.n_layers + 1} layers)"
    details = [
        f"{info.path.name} · {gib_fixed(info.size_bytes)} · {where}",
        f"context {engine.n_ctx:,} tokens · vision {'on' if info.has_vision else 'off'}"
        + _image_sizing(session),
        "Type a message, /help for commands, Ctrl-D to leave.",
    ]
    notices = [n for n in (build.notice, session.system_notice()) if n]
    return ChatHeader(title=build.label, details=details, notices=notices)


def _image_sizing(session: ChatSession) -> str:
    policy = session.image_policy
    if not session.engine.info.has_vision:
        return ""
    if policy.max_tokens is not None:
        return f" · images up to {policy.max_tokens} tokens"
    if policy.auto:
        return f" · images sized for about {policy.target_s:.0f} s on this CPU"
    return ""


ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue the last chat (saved after every turn), after a crash or a "
    "closed terminal.")]


@with_run_flags
def chat(model: ModelArg = None, resume: ResumeOpt = False, *, flags: RunFlags) -> None:
    """Chat with Mistral Small 3.2 about text and images."""
    from localsmall import paths
    from localsmall.commands.starting import started_session
    from localsmall.errors import LocalsmallError
    from localsmall.ui.chat_screen import run_chat
    from localsmall.ui.console import notice

    options = flags.run_options(model)
    with started_session(options, flags.session_options(), yes=flags.yes) as (
            session, build, _):
        if options.rpc:
            from localsmall.chat.rescue import rescue_conversation
            from localsmall.engine.rpc import add_rescue

            add_rescue(lambda: rescue_conversation(session))
        session.autosave_path = paths.last_chat_file()
        resumed = None
        if resume:
            try:
                resumed = session.resume()
            except LocalsmallError as exc:  # a damaged file, an image gone: chat anyway
                notice(f"The last chat could not be resumed ({exc}); starting a new one.")
            else:
                if resumed is None:
                    notice("There is no earlier chat to resume: starting a new one.")
        run_chat(session, header_for(session, build), history_path=paths.history_file(),
                 resumed=resumed)
