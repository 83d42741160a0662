"""Token sampling (llama.cpp's sampler chain) built from `SamplingSettings`."""

from __future__ import annotations

from typing import Any

import numpy as np

from localsmall.engine.types import SamplingSettings

_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed each time


def sampler_chain(llama: Any, n_vocab: int, sampling: SamplingSettings) -> Any:
    """A sampler chain for `sampling`; the caller frees it (`llama_sampler_free`)."""
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    add = llama.llama_sampler_chain_add
    if sampling.logit_bias:
        biases = (llama.llama_logit_bias * len(sampling.logit_bias))(
            *[llama.llama_logit_bias(t, b) for t, b in sampling.logit_bias])
        add(chain, llama.llama_sampler_init_logit_bias(n_vocab, len(sampling.logit_bias),
                                                       biases))
    if sampling.repeat_penalty != 1.0 or sampling.presence_penalty or sampling.frequency_penalty:
        add(chain, llama.llama_sampler_init_penalties(
            n_vocab, 64, sampling.repeat_penalty, sampling.frequency_penalty,
            sampling.presence_penalty))
    if sampling.temperature <= 0:
        add(chain, llama.llama_sampler_init_greedy())
        return chain
    if sampling.top_k > 0:
        add(chain, llama.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        add(chain, llama.llama_sampler_init_top_p(sampling.top_p, 1))
    if sampling.min_p > 0:
        add(chain, llama.llama_sampler_init_min_p(sampling.min_p, 1))
    add(chain, llama.llama_sampler_init_temp(sampling.temperature))
    seed = sampling.seed if sampling.seed is not None else _RANDOM_SEED
    add(chain, llama.llama_sampler_init_dist(seed))
    return chain


def plain_greedy(sampling: SamplingSettings) -> bool:
    """Whether `sampling` is the most likely token and nothing else (no penalty, bias or
    grammar): then `argmax_token` gives what the sampler chain would."""
    return (sampling.temperature <= 0 and not sampling.logit_bias
            and sampling.repeat_penalty == 1.0 and not sampling.presence_penalty
            and not sampling.frequency_penalty and sampling.constraint is None)


def argmax_token(llama: Any, ctx: Any, n_vocab: int) -> int:
    """The most likely next token (the first of equals, as llama.cpp's greedy sampler
    picks). llama_sampler_sample copies all logits into a candidate array first:
    ~0.12 ms per token for a 131k vocabulary, against ~0.01 ms here."""
    logits = llama.llama_get_logits_ith(ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())
