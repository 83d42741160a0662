"""`localsmall pull`: download a build (the planned one by default) and its projector."""

from __future__ import annotations

import sys

from localsmall.commands.options import ModelArg, NoVisionOpt, YesOpt


def pull(model: ModelArg = None, no_vision: NoVisionOpt = False, yes: YesOpt = False) -> None:
    """Download a build into the Hugging Face cache, verified and resumable."""
    from localsmall.models.catalog import load_catalog
    from localsmall.runtime.pull import pull_build, pull_request
    from localsmall.ui.console import muted, notice
    from localsmall.ui.progress import DownloadProgress
    from localsmall.ui.questions import confirm
    from localsmall.units import gib

    request = pull_request(load_catalog(), model, projector=not no_vision)
    if request.reason:
        muted(request.reason)
    if request.missing and not yes and sys.stdin.isatty() and not confirm(
            f"Download {request.ref} ({gib(request.missing)})?"):
        raise SystemExit(1)
    with DownloadProgress() as progress:
        result = pull_build(request, on_progress=progress)
    for file in result.files:
        how = ("downloaded" if file.downloaded else "already downloaded")
        if file.resumed_from:
            how += f", resumed at {gib(file.resumed_from)}"
        if file.repaired:
            how += ", replacing a damaged copy"
        check = "sha256 verified" if file.sha256 else "no sha256 to check against"
        notice(f"{file.remote.file}: {gib(file.size)}, {how}, {check}")
    notice(f"{request.ref} is ready: localsmall chat {request.ref}")
