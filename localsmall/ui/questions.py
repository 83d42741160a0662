"""Questions to the user, asked on stderr."""

from __future__ import annotations

from rich.prompt import Confirm

from localsmall.errors import ModelNotFoundError
from localsmall.runtime.pull import OfferPull, PullRequest
from localsmall.ui.console import err, muted, notice
from localsmall.units import gib


def confirm(question: str, *, default: bool = True) -> bool:
    """Yes or no (Ctrl-D counts as no)."""
    try:
        return Confirm.ask(question, console=err(), default=default)
    except EOFError:
        return False


def pull_offer_handler(*, yes: bool) -> OfferPull:
    """Answers a run's offer to download a missing build: yes with --yes, else asks on
    a terminal; without a terminal it is an error naming the command to run."""
    import sys

    def answer(offer: PullRequest) -> bool:
        size = gib(offer.missing)
        if yes:
            notice(f"Downloading {offer.ref} ({size}).")
            return True
        if not sys.stdin.isatty():
            raise ModelNotFoundError(f"{offer.ref} is not downloaded yet ({size}); run "
                                     f"`localsmall pull {offer.ref}` first, or pass --yes to "
                                     "download it now")
        if offer.reason:
            muted(offer.reason)
        return confirm(f"{offer.ref} is not downloaded yet. Download it now ({size})?")

    return answer
