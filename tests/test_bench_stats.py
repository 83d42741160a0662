"""The statistics behind `localsmall bench`: llama-bench's mean and deviation, and
llama-perplexity's compact reference log-probs and KL divergence (pure numpy)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from localsmall.bench.kld import (
    LOG_PROB_RANGE,
    DivergenceAccumulator,
    dequantize_log_probs,
    negative_log_likelihood,
    quantize_log_probs,
    row_words,
)
from localsmall.bench.stats import Measurement, rates


def _logits(seed: int, n: int = 24, n_vocab: int = 3001, scale: float = 4.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, n_vocab)) * scale).astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def test_measurement_is_mean_and_sample_deviation() -> None:
    m = Measurement.of([1.0, 2.0, 4.0])
    assert m.mean == pytest.approx(7 / 3)
    assert m.stdev == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert Measurement.of([5.0]).stdev == 0.0
    # llama-bench averages the per-run rates, not the rate of the mean time
    r = rates(10, [1.0, 2.0])
    assert r.samples == (10.0, 5.0) and r.mean == 7.5


def test_stored_log_probs_round_trip_within_half_a_step() -> None:
    logits = _logits(0)
    rows = quantize_log_probs(logits)
    assert rows.shape == (24, row_words(3001)) and rows.dtype == np.uint16
    exact = _log_softmax(logits)
    back = dequantize_log_probs(rows, 3001)
    kept = exact > exact.max(axis=1, keepdims=True) - LOG_PROB_RANGE
    step = (LOG_PROB_RANGE / 65535)
    assert np.abs(back - exact)[kept].max() <= step / 2 + 1e-5
    # everything further below the top than the range is clamped to its floor
    floor = back.min(axis=1, keepdims=True)
    assert np.all(back[~kept] == np.broadcast_to(floor, back.shape)[~kept])


def test_a_model_against_itself_diverges_by_nothing() -> None:
    logits = _logits(1)
    targets = np.random.default_rng(2).integers(0, 3001, 24)
    acc = DivergenceAccumulator()
    acc.add(logits, quantize_log_probs(logits), targets)
    d = acc.result()
    # Not exactly 0: the stored reference rounds each log-prob by up to half a step
    # (16 / 65535 / 2 = 1.2e-4 nats, 0 for the top token); the KLD is their p-weighted
    # mean, which averages to ~1e-6 nats. llama-perplexity reports the same.
    assert abs(d.kld) < 1e-5
    assert d.same_top == 1.0 and d.same_top_error == 0.0
    nll = negative_log_likelihood(logits, targets)
    assert d.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-6)


def test_divergence_matches_the_exact_kl_of_the_distributions() -> None:
    reference = _logits(3)
    noisy = reference + np.random.default_rng(4).standard_normal(reference.shape).astype(
        np.float32)
    targets = np.random.default_rng(5).integers(0, 3001, 24)
    acc = DivergenceAccumulator()
    acc.add(noisy, quantize_log_probs(reference), targets)
    d = acc.result()
    p, q = _log_softmax(reference), _log_softmax(noisy)
    exact = (np.exp(p) * (p - q)).sum(axis=1)
    assert d.kld == pytest.approx(exact.mean(), rel=2e-3)
    assert d.kld_error == pytest.approx(exact.std(ddof=0) / math.sqrt(23), rel=2e-2)
    agree = (reference.argmax(axis=1) == noisy.argmax(axis=1)).mean()
    assert d.same_top == pytest.approx(agree)
    assert 0 < d.rms_dp < 1
