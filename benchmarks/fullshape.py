"""A full-size Mistral-Small-3.2-shaped text GGUF in one of llama.cpp's quant mixes, with
random quantized blocks (no training, no download): the tensor types a real build of that
quant has (localsmall.plan.quant_mix: attn_v, attn_output and ffn_down take larger types
in some layers), for measuring speed and memory on the real architecture.

    python benchmarks/fullshape.py /work/fullshape/q3km-40L.gguf --quant Q3_K_M

The vocabulary and chat template come from the shared test tools (make_tiny.py, which
needs mistral-common for the tekken vocabulary).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 5120, 32, 8, 128, 32768


def main() -> None:
    import gguf

    from localsmall.bench.calibration_model import random_blocks
    from localsmall.models.shape import DecoderShape
    from localsmall.plan import quant_mix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--quant", default="Q4_K_M", choices=sorted(quant_mix.BASE_TYPE))
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--tools", type=Path, default=Path("/work/shared/tools"),
                        help="folder of make_tiny.py (vocabulary and chat template)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tools))
    from make_tiny import CHAT_TEMPLATE, load_tekken_vocab

    tokens, toktypes, merges, special = load_tekken_vocab(None)
    shape = DecoderShape(args.layers, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, len(tokens))
    base = quant_mix.BASE_TYPE[args.quant]
    writer = gguf.GGUFWriter(str(args.out), "llama")
    writer.add_name(f"fullshape-mistral-small-3.2-{args.quant}")
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{args.quant}"])
    writer.add_context_length(131072)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(1e9)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["bos"])
    writer.add_eos_token_id(special["eos"])
    writer.add_unk_token_id(special["unk"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    matrices = quant_mix.matrix_shapes(shape)
    plan: list[tuple[str, int, int, str]] = [("token_embd.weight", len(tokens), N_EMBD, base)]
    for i in range(args.layers):
        types = quant_mix.layer_types(args.quant, layer=i, n_layers=args.layers,
                                      n_gqa=N_HEAD // N_HEAD_KV)
        assert types is not None
        plan.append((f"blk.{i}.attn_norm.weight", 1, N_EMBD, "norm"))
        plan += [(f"blk.{i}.{name}.weight", *matrices[name], types[name])
                 for name in ("attn_q", "attn_k", "attn_v", "attn_output")]
        plan.append((f"blk.{i}.ffn_norm.weight", 1, N_EMBD, "norm"))
        plan += [(f"blk.{i}.{name}.weight", *matrices[name], types[name])
                 for name in ("ffn_gate", "ffn_up", "ffn_down")]
    plan += [("output_norm.weight", 1, N_EMBD, "norm"),
             ("output.weight", len(tokens), N_EMBD, quant_mix.output_type(args.quant) or base)]
    for name, rows, cols, kind in plan:
        if kind == "norm":
            writer.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8),
                                   rows * cols // block * size, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, rows, cols, kind in plan:
        writer.write_tensor_data(np.ones(cols, np.float32) if kind == "norm"
                                 else random_blocks(rng, rows, cols, kind))
    writer.close()
    with open(args.out, "rb") as written:
        os.fsync(written.fileno())
    print(args.out, args.out.stat().st_size)


if __name__ == "__main__":
    main()
