"""llama.cpp and mtmd write nothing to the terminal unless --verbose."""

from __future__ import annotations

import subprocess
import sys

LLAMA_LOG_MARKERS = ("llama_model_loader", "load_tensors", "clip_model_loader", "llama_context",
                     "print_info", "load_hparams", "sched_reserve")


def _run(tiny, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "localsmall", "run", "hi", "--model", str(tiny.f16),
            "--mmproj", str(tiny.mmproj), "--ctx", "1024", "-n", "2", *extra]
    return subprocess.run(args, capture_output=True, text=True, errors="replace", check=True)


def test_quiet_by_default(tiny) -> None:
    done = _run(tiny)
    assert done.stderr.strip() == "", done.stderr
    assert done.stdout.strip()


def test_verbose_shows_llama_cpp_logs(tiny) -> None:
    done = _run(tiny, "--verbose")
    assert any(marker in done.stderr for marker in LLAMA_LOG_MARKERS), done.stderr[:500]
