"""Perplexity and KL divergence against a reference model: the statistics of
llama.cpp's `llama-perplexity --kl-divergence`, in numpy.

The reference's next-token distributions are stored compactly, as llama.cpp does: per
scored token, a float32 scale and offset and one uint16 per vocabulary entry holding
the log-probability quantized over the 16 nats below the top logit (lower values are
clamped, and ignored in the divergence). At Mistral's 131072-entry vocabulary that is
256 KiB per token instead of 512 KiB of float32, and it lets the reference be computed
once, written to disk and the reference model unloaded before any quant is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_PROB_RANGE = 16.0  # nats below the most likely token that are kept
HEADER_WORDS = 4       # the two float32 (scale, min log-prob) at the start of a row


def row_words(n_vocab: int) -> int:
    """uint16 words per stored token (llama.cpp's layout: header, then an even count)."""
    return 2 * ((n_vocab + 1) // 2) + HEADER_WORDS


def _log_sum_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max logit, log of the sum of exp(logit - max)) per row."""
    top = logits.max(axis=1)
    total = np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)
    return top, np.log(total).astype(np.float32)


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row, float64."""
    top, lse = _log_sum_exp(logits)
    picked = logits[np.arange(len(targets)), targets]
    return (top.astype(np.float64) + lse - picked).astype(np.float64)


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """Rows of uint16 (see module doc) for float32 logits [n, n_vocab]."""
    n, n_vocab = logits.shape
    top, lse = _log_sum_exp(logits)
    low = np.maximum(logits.min(axis=1), top - LOG_PROB_RANGE)
    scale = ((top - low) / 65535.0).astype(np.float32)
    min_log_prob = (low - top - lse).astype(np.float32)
    rows = np.empty((n, row_words(n_vocab)), dtype=np.uint16)
    rows[:, n_vocab + HEADER_WORDS:] = 0
    rows[:, :HEADER_WORDS] = np.stack([scale, min_log_prob], axis=1).view(np.uint16)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    steps = logits - low[:, None]          # in place from here: one temporary array
    steps *= inv[:, None]
    np.rint(steps, out=steps)
    np.clip(steps, 0, 65535, out=steps)    # at or below `low`: 0
    rows[:, HEADER_WORDS:HEADER_WORDS + n_vocab] = steps
    return rows


def dequantize_log_probs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """float32 log-probabilities [n, n_vocab] back from stored rows."""
    header = np.ascontiguousarray(rows[:, :HEADER_WORDS]).view(np.float32)
    scale, min_log_prob = header[:, 0], header[:, 1]
    values = rows[:, HEADER_WORDS:HEADER_WORDS + n_vocab].astype(np.float32)
    values *= scale[:, None]
    values += min_log_prob[:, None]
    return values


def _mean_and_error(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity computes them."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    variance = total_sq / count - mean * mean
    error = math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0
    return mean, error


@dataclass(frozen=True)
class Divergence:
    """How far a model's predictions are from the reference's, with standard errors."""

    count: int
    ppl: float
    ppl_error: float
    ppl_reference: float
    kld: float
    kld_error: float
    same_top: float          # fraction of tokens whose most likely next token agrees
    same_top_error: float
    rms_dp: float            # RMS of the change in the probability of the right token
    rms_dp_error: float


@dataclass
class DivergenceAccumulator:
    """Running sums over scored tokens (llama.cpp's kl_divergence_result)."""

    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_dp2: float = 0.0
    sum_dp4: float = 0.0
    same_top: int = 0

    def add(self, logits: np.ndarray, reference_rows: np.ndarray, targets: np.ndarray) -> None:
        """Score one chunk: the model's logits [n, n_vocab] against the reference rows
        for the same positions, `targets` the tokens that actually came next."""
        n, n_vocab = logits.shape
        rows = np.arange(n)
        top, lse = _log_sum_exp(logits)
        log_norm = top + lse                                   # log of the softmax normaliser
        nll = (log_norm.astype(np.float64) - logits[rows, targets]).astype(np.float64)
        base = dequantize_log_probs(reference_rows, n_vocab)
        nll_base = -base[rows, targets].astype(np.float64)
        # sum over kept entries of p_ref * (log p_ref - log p_model), with two temporaries
        terms = logits - log_norm[:, None]                     # log p_model
        np.subtract(base, terms, out=terms)
        terms *= np.exp(base)
        terms[base <= -LOG_PROB_RANGE] = 0
        kld = terms.sum(axis=1, dtype=np.float64)
        dp = np.exp(-nll) - np.exp(-nll_base)
        self.count += n
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        self.sum_nll_base += float(nll_base.sum())
        self.sum_nll_base2 += float((nll_base * nll_base).sum())
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.sum_dp2 += float((dp * dp).sum())
        self.sum_dp4 += float((dp**4).sum())
        self.same_top += int((logits.argmax(axis=1) == base.argmax(axis=1)).sum())

    def result(self) -> Divergence:
        """The statistics so far."""
        log_ppl, log_ppl_error = _mean_and_error(self.sum_nll, self.sum_nll2, self.count)
        log_ppl_base, _ = _mean_and_error(self.sum_nll_base, self.sum_nll_base2, self.count)
        kld, kld_error = _mean_and_error(self.sum_kld, self.sum_kld2, self.count)
        mse, mse_error = _mean_and_error(self.sum_dp2, self.sum_dp4, self.count)
        rms = math.sqrt(mse)
        same = self.same_top / self.count if self.count else 0.0
        same_error = (math.sqrt(same * (1 - same) / (self.count - 1))
                      if self.count > 1 else 0.0)
        ppl = math.exp(log_ppl)
        return Divergence(
            count=self.count, ppl=ppl, ppl_error=ppl * log_ppl_error,
            ppl_reference=math.exp(log_ppl_base), kld=kld, kld_error=kld_error,
            same_top=same, same_top_error=same_error,
            rms_dp=rms, rms_dp_error=0.5 / rms * mse_error if rms > 0 else 0.0)


@dataclass
class PerplexityAccumulator:
    """Exact perplexity of one model (the reference's own, from its float logits)."""

    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0

    def add(self, nll: np.ndarray) -> None:
        self.count += len(nll)
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())

    def result(self) -> tuple[float, float]:
        """(perplexity, its standard error)."""
        log_ppl, error = _mean_and_error(self.sum_nll, self.sum_nll2, self.count)
        ppl = math.exp(log_ppl)
        return ppl, ppl * error
