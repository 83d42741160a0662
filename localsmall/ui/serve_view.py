"""What `localsmall serve` shows: where it listens, then one line per request (stderr)."""

from __future__ import annotations

from rich.markup import escape

from localsmall.server.runner import Listening, Ready
from localsmall.server.scheduler import RequestLog
from localsmall.ui.console import err, out, warn


def show_exposure(message: str | None) -> None:
    """The warning for a server other machines can reach (nothing on loopback)."""
    if message:
        warn(message)


def show_listening(listening: Listening, *, api_key: bool) -> None:
    """The URL and model id on stdout (for scripts), the details on stderr. The model
    loads next (/health answers "loading" meanwhile)."""
    out().print(f"{listening.url}  model: {listening.model_id}", soft_wrap=True)
    err().print(f"[muted]Serving the OpenAI API at {escape(listening.url)} · "
                f"queue {listening.max_queue} · "
                f"{'API key required' if api_key else 'no API key'} · Ctrl-C stops · "
                "loading the model…[/]")


def show_ready(ready: Ready) -> None:
    """The model is loaded: requests are answered from now on. Then what became of the
    default system prompt: restored from the cache, or being read (requests wait)."""
    slots = f"{ready.slots} warm slot{'s' if ready.slots != 1 else ''}"
    warm = ready.system_prompt
    if warm is not None and warm.notice:
        warn(warm.notice)
    if warm is None:
        line = ""
    elif warm.state == "restored":
        line = f" · system prompt restored from cache ({warm.seconds:.3f} s)"
    elif warm.state == "reading":
        line = (f" · reading the system prompt ({warm.tokens} tokens) in the background; "
                "requests that use it wait for it")
    else:
        line = " · the system prompt is read with the first request"
    err().print(f"[muted]Ready · {slots}{escape(line)}[/]")


def show_request(entry: RequestLog) -> None:
    """One line as a request starts and ends."""
    short = entry.id.removeprefix("chatcmpl-")[:8]
    if not entry.id:  # the server's own work (reading the system prompt)
        err().print(f"[muted]{escape(entry.message)}[/]")
    elif entry.phase == "started":
        err().print(f"[muted]{short} started · slot {entry.slot} · "
                    f"{entry.cached_tokens} tokens cached · {entry.waiting} waiting[/]")
    elif entry.phase == "progress":
        err().print(f"[muted]{short} {escape(entry.message)}[/]")
    elif entry.phase == "finished":
        err().print(f"{short} done · prompt {entry.prompt_tokens} ({entry.cached_tokens} "
                    f"cached) · {entry.completion_tokens} generated · first token "
                    f"{entry.time_to_first_token_s:.2f}s · {entry.seconds:.2f}s")
    elif entry.phase == "cancelled":
        err().print(f"[warn]{short} cancelled after {entry.completion_tokens} tokens[/]")
    else:
        err().print(f"[error]{short} failed:[/] {escape(entry.message)}")
