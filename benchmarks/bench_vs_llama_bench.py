"""Does `localsmall bench` measure llama.cpp, not Python? Runs llama.cpp's own
`llama-bench` and `localsmall bench` on the same file with the same settings and
prints pp_localsmall / pp_llama_bench and tg_localsmall / tg_llama_bench (target: each
within 3% of 1.0).

llama-bench is built from the llama-cpp-python source archive of the installed version
(so the same llama.cpp commit localsmall runs on): `pip download`ed into
benchmarks/.cache, configured in Release and built for the llama-bench target only.
The model is a synthetic Mistral-shaped GGUF (~450M parameters, random weights, the
real tekken vocabulary) written as F16 and quantized to Q4_K_M, large enough that a
pp512 run takes seconds. Nothing here is committed: benchmarks/.cache is gitignored.

The two tools are run alternately (`--rounds`), each run waits for the CPUs to be
quiet, and the headline ratio compares each tool's best repetition (the run least
disturbed by anything else, as `timeit` takes the minimum), so a burst of load from
another process on a shared machine does not decide the ratio. The ratio of the means
of each round is printed too.

    python benchmarks/bench_vs_llama_bench.py [--threads N] [--rounds 2] [-r 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
TARGET = 0.03  # allowed relative difference

sys.path.insert(0, str(ROOT))

from placement import Placement, reference_placement  # noqa: E402


@dataclass(frozen=True)
class Speeds:
    """Tokens per second of each repetition."""

    pp: tuple[float, ...]
    tg: tuple[float, ...]

    def mean(self, key: str) -> float:
        values = getattr(self, key)
        return sum(values) / len(values)

    def __str__(self) -> str:
        return "  ".join(f"{k} {self.mean(k):8.2f} (best {max(getattr(self, k)):8.2f})"
                         for k in ("pp", "tg"))


def cpu_busy(interval: float = 2.0) -> float:
    """Share of the CPUs busy over `interval` seconds (Linux; 0 elsewhere)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except OSError:
        return 0.0
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> None:
    """Wait (up to `max_wait` s) until other processes leave the CPUs mostly idle."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    if busy > threshold:
        print(f"note: the CPUs are {busy:.0%} busy with other work; numbers will be noisy",
              flush=True)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload]


# --- llama-bench from the llama-cpp-python source archive --------------------------------


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's source archive."""
    wanted = version("llama-cpp-python")
    name = f"llama_cpp_python-{wanted}"
    source = CACHE / "src" / name / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    archive = CACHE / "sdist" / f"{name}.tar.gz"
    if not archive.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={wanted}", "-d", str(archive.parent)])
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE / "src", filter="data")
    return source


def build_llama_bench(jobs: int) -> Path:
    """Configure (Release, like the wheel: shared libs, native CPU flags) and build only
    the llama-bench target."""
    build = CACHE / "build"
    binary = build / "bin" / "llama-bench"
    if not (build / "CMakeCache.txt").is_file():
        run(["cmake", "-S", str(llama_cpp_source()), "-B", str(build),
             "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"])
    run(["cmake", "--build", str(build), "--config", "Release", "--target", "llama-bench",
         "-j", str(jobs)])
    return binary


# --- the model -----------------------------------------------------------------------------


def synthetic_model() -> Path:
    """A ~290 MB Q4_K_M of a random ~450M-parameter Mistral-shaped model."""
    from localsmall.convert.gguf_files import TextHParams
    from tests import tinymodels as tm

    dest = CACHE / "models" / "bench-450M-Q4_K_M.gguf"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    hp = TextHParams(n_layers=12, n_embd=1024, n_head=8, n_head_kv=2, head_dim=128,
                     n_ff=4096, n_vocab=131072)
    f16 = dest.with_name("bench-450M-F16.gguf")
    print(f"writing {f16.name} ...", flush=True)
    tm.write_text_model(f16, hp=hp, chat_template=tm.builtin_template())
    print(f"quantizing to {dest.name} ...", flush=True)
    tm.quantize(f16, dest, "Q4_K_M")
    f16.unlink()
    return dest


# --- the two tools -------------------------------------------------------------------------


def localsmall_speeds(model: Path, args: argparse.Namespace) -> tuple[Speeds, list[str]]:
    out = run([sys.executable, "-m", "localsmall", "bench", "--model", str(model),
               "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions),
               "-t", str(args.threads), "--gpu-layers", str(args.gpu_layers),
               "--batch", str(args.batch), "--json"], stdout=subprocess.PIPE).stdout
    row = json.loads(out)["speed"][0]
    return Speeds(tuple(row["pp"]["samples"]), tuple(row["tg"]["samples"])), row["notes"]


def llama_bench_command(binary: Path, model: Path, args: argparse.Namespace,
                        placement: Placement) -> list[str]:
    """llama-bench's command line, its weights placed as localsmall places them (on an AMX
    CPU llama-bench's default, repacking on, crashes in the AMX buffer: `--repack 0`)."""
    cmd = [str(binary), "-m", str(model), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.repetitions), "-t", str(args.threads), "-ngl", str(args.gpu_layers),
           "-b", str(args.batch), "-ub", str(min(args.batch, 512)), "-o", "json"]
    return [*cmd, "--repack", "1" if placement.repack else "0"]


def llama_bench_speeds(binary: Path, model: Path, args: argparse.Namespace,
                       placement: Placement) -> Speeds:
    cmd = llama_bench_command(binary, model, args, placement)
    tests = json.loads(run(cmd, stdout=subprocess.PIPE).stdout)
    pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
    tg = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
    return Speeds(tuple(pp["samples_ts"]), tuple(tg["samples_ts"]))


def main() -> int:
    from localsmall.engine.model import default_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", "-t", type=int, default=default_threads())
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--n-prompt", "-p", type=int, default=512)
    parser.add_argument("--n-gen", "-n", type=int, default=128)
    parser.add_argument("--repetitions", "-r", type=int, default=5)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=180,
                        help="seconds to wait for idle CPUs before each run")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="build jobs")
    args = parser.parse_args()

    binary = build_llama_bench(args.jobs)
    model = synthetic_model()
    print(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB), "
          f"threads {args.threads}", flush=True)
    env_note = os.environ.get("LOCALSMALL_WEIGHT_REPACK", "auto")
    placement = reference_placement()
    print(placement.note, flush=True)
    ours: list[Speeds] = []
    theirs: list[Speeds] = []
    for round_no in range(1, args.rounds + 1):
        wait_for_quiet(args.quiet_wait)
        speeds, notes = localsmall_speeds(model, args)
        ours.append(speeds)
        # Compare like with like: llama-bench places the weights as localsmall does.
        repack = placement.repack
        if repack == any("repacking off" in n for n in notes):
            print("note: localsmall bench reports another weight placement than expected: "
                  f"{'; '.join(notes)}", flush=True)
        wait_for_quiet(args.quiet_wait)
        theirs.append(llama_bench_speeds(binary, model, args, placement))
        print(f"round {round_no}: localsmall  {ours[-1]}\n         llama-bench {theirs[-1]}"
              f"\n         ratio of means: pp {ours[-1].mean('pp') / theirs[-1].mean('pp'):.3f}"
              f"  tg {ours[-1].mean('tg') / theirs[-1].mean('tg'):.3f}"
              f"  (weight repacking {'on' if repack else 'off'}, "
              f"LOCALSMALL_WEIGHT_REPACK={env_note})", flush=True)

    print()
    print(f"{'':6}{'localsmall':>12}{'llama-bench':>14}{'ratio':>9}")
    ratios = {}
    for key, n in (("pp", args.n_prompt), ("tg", args.n_gen)):
        mine = max(v for s in ours for v in getattr(s, key))
        ref = max(v for s in theirs for v in getattr(s, key))
        ratios[key] = mine / ref
        print(f"{key}{n:<4}{mine:12.2f}{ref:14.2f}{ratios[key]:9.3f}  t/s, best repetition "
              f"of {args.rounds} x {args.repetitions}")
    within = all(abs(r - 1) <= TARGET for r in ratios.values())
    print(f"\ntarget: within {TARGET:.0%} of llama-bench -> {'met' if within else 'MISSED'}")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
