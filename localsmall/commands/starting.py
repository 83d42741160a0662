"""The start both `chat` and `run` make: plan and pull the build (with a download bar
and the user's consent), load it (with a progress bar), open a chat session on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localsmall.chat.session import ChatSession
    from localsmall.models.resolve import LocalBuild
    from localsmall.runtime.options import RunOptions, SessionOptions
    from localsmall.ui.progress import WorkProgress


@contextmanager
def started_session(options: RunOptions, session_options: SessionOptions, *, yes: bool,
                    check: Callable[[LocalBuild], None] | None = None
                    ) -> Iterator[tuple[ChatSession, LocalBuild, WorkProgress]]:
    """A chat session on the planned build; `check` may refuse the build before it is
    loaded. The engine is closed when the block ends."""
    from localsmall.runtime.start import load_engine, prepare, start_session
    from localsmall.ui.progress import CalibrationLine, DownloadProgress, WorkProgress
    from localsmall.ui.questions import pull_offer_handler

    with DownloadProgress() as download, CalibrationLine() as calibrating:
        build = prepare(options, offer_pull=pull_offer_handler(yes=yes), on_download=download,
                        on_calibrate=calibrating)
    if check is not None:
        check(build)
    with WorkProgress() as progress:
        engine = load_engine(build, options, on_progress=progress)
    with engine:  # closing it first stops a background read of the system prompt
        yield start_session(engine, build, session_options), build, progress
