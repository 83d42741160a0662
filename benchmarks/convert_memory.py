"""Memory and speed of `localsmall convert` on a generated multi-GB checkpoint.

Writes a transformers-layout MistralForCausalLM checkpoint of random BF16 values with a
realistic layer layout (real 131072-token vocabulary, GQA, 128-wide heads; sharded with
an index), converts it in a child process, and reports:

- peak RSS of the conversion (the child's VmHWM) against the target
  "1.5 GB + the largest tensor";
- throughput (input MB/s) against a plain copy of the same input files, measured in the
  same run (copy + fsync, as the converter syncs its output): the ratio is what counts.

Everything generated is deleted at the end. Usage:
    python benchmarks/convert_memory.py [--layers 5] [--dir /tmp] [--outtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 64 * 1024 * 1024
SHARD_BYTES = 1 << 30


def shapes(n_layers: int, n_embd: int, n_ff: int, n_head: int, n_kv: int, head_dim: int,
           n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a MistralForCausalLM checkpoint."""
    q, kv = n_head * head_dim, n_kv * head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (n_vocab, n_embd)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (n_embd,),
                p + "self_attn.q_proj.weight": (q, n_embd),
                p + "self_attn.k_proj.weight": (kv, n_embd),
                p + "self_attn.v_proj.weight": (kv, n_embd),
                p + "self_attn.o_proj.weight": (n_embd, q),
                p + "post_attention_layernorm.weight": (n_embd,),
                p + "mlp.gate_proj.weight": (n_ff, n_embd),
                p + "mlp.up_proj.weight": (n_ff, n_embd),
                p + "mlp.down_proj.weight": (n_embd, n_ff)}
    out["model.norm.weight"] = (n_embd,)
    out["lm_head.weight"] = (n_vocab, n_embd)
    return out


def _fill(view: np.ndarray, rng: np.random.Generator) -> None:
    """Random BF16 values of moderate size (sign, exponent 2^-8..2^-1, random mantissa)."""
    flat = view.reshape(-1)
    for start in range(0, flat.size, CHUNK // 2):
        part = flat[start:start + CHUNK // 2]
        bits = rng.integers(0, 1 << 16, part.size, dtype=np.uint16)
        part[:] = (bits & 0x807F) | (((bits >> 7) & 0x7) + 0x77 << 7)


def write_shard(path: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator
                ) -> None:
    """One BF16 .safetensors file, data filled through a numpy memmap."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.truncate(8 + len(raw) + offset)
    data = np.memmap(path, np.uint16, "r+", offset=8 + len(raw), shape=(offset // 2,))
    _fill(data, rng)
    data.flush()
    del data


REAL = {"n_embd": 3072, "n_ff": 8192, "n_head": 24, "n_kv": 8, "head_dim": 128}
TINY = {"n_embd": 64, "n_ff": 64, "n_head": 1, "n_kv": 1, "head_dim": 64}


def write_checkpoint(directory: Path, n_layers: int, dims: dict[str, int] = REAL
                     ) -> tuple[int, int]:
    """The checkpoint; returns (total bytes, largest tensor bytes)."""
    from mistral_common import __file__ as mc_file

    all_shapes = shapes(n_layers, n_vocab=131072, **dims)
    directory.mkdir(parents=True)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in all_shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(directory / file, shard, rng)
        weight_map |= dict.fromkeys(shard, file)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
              "hidden_size": dims["n_embd"], "num_hidden_layers": n_layers,
              "num_attention_heads": dims["n_head"], "num_key_value_heads": dims["n_kv"],
              "head_dim": dims["head_dim"], "intermediate_size": dims["n_ff"],
              "vocab_size": 131072, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
              "rope_theta": 1e9, "sliding_window": None}
    (directory / "config.json").write_text(json.dumps(config))
    tekken = Path(mc_file).parent / "data" / "tekken_240911.json"
    shutil.copyfile(tekken, directory / "tekken.json")
    sizes = [int(np.prod(s)) * 2 for s in all_shapes.values()]
    return sum(sizes), max(sizes)


def timed_copy(directory: Path, dest: Path) -> float:
    """Seconds to copy the weight files (and fsync them), as a reference speed."""
    dest.mkdir()
    start = time.perf_counter()
    for file in sorted(directory.glob("*.safetensors")):
        target = dest / file.name
        shutil.copyfile(file, target)
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dest)
    return seconds


def _vm_hwm(pid: int) -> int:
    """The process's peak resident set (VmHWM, bytes), or 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed_convert(directory: Path, out: Path, outtype: str) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of `localsmall convert` in a child process. The peak
    is sampled from /proc (VmHWM only grows): ru_maxrss of a child started with vfork
    would include this process's own peak from generating the checkpoint."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "localsmall", "convert", str(directory), "--out", str(out),
         "--outtype", outtype], env=os.environ | {"LOCALSMALL_HOME": str(out / "home")},
        stdout=subprocess.DEVNULL)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _vm_hwm(child.pid))
        time.sleep(0.05)
    if child.returncode != 0:
        raise SystemExit(f"convert failed with status {child.returncode}")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5, help="decoder layers (~0.2 GB each)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--outtype", default="bf16", choices=["bf16", "f16", "f32", "q8_0"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="localsmall-convert-bench-", dir=args.dir))
    try:
        ckpt = work / "bench-mistral"
        t0 = time.perf_counter()
        total, largest = write_checkpoint(ckpt, args.layers)
        print(f"checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s, "
              f"largest tensor {largest / 1e6:.0f} MB")
        # The fixed cost (start-up, 131k-token vocabulary, merges): same tokenizer, tiny
        # weights. It does not grow with the model, so the streaming rate excludes it.
        write_checkpoint(work / "fixed-cost", 1, TINY)
        fixed_s, _ = timed_convert(work / "fixed-cost", work / "fixed-out", args.outtype)
        copy_s = timed_copy(ckpt, work / "copy")
        convert_s, peak = timed_convert(ckpt, work / "out", args.outtype)
        stream_s = max(convert_s - fixed_s, 1e-3)
        target = 1.5e9 + largest
        print(f"plain copy:  {total / 1e6 / copy_s:8.0f} MB/s ({copy_s:.1f} s, with fsync)")
        print(f"convert:     {total / 1e6 / convert_s:8.0f} MB/s ({convert_s:.1f} s, "
              f"--outtype {args.outtype}, everything included)")
        print(f"  fixed cost {fixed_s:.1f} s (start-up + tokenizer); streaming "
              f"{total / 1e6 / stream_s:.0f} MB/s")
        print(f"speed ratio convert/copy: {copy_s / convert_s:.2f} overall, "
              f"{copy_s / stream_s:.2f} streaming")
        print(f"peak RSS:    {peak / 1e6:8.0f} MB (target < {target / 1e6:.0f} MB = 1.5 GB + "
              f"largest tensor; ratio {peak / target:.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
