"""ggml's float conversion kernels give numpy's results, bit for bit."""

from __future__ import annotations

import numpy as np

from localsmall.engine.kernels import BLOCK, bf16_to_f16, bf16_to_f32, f32_to_f16


def _bf16_samples() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(BLOCK + 12345).astype(np.float32),       # more than one block
        np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 70000.0, 1e-8, 6e-5, 2.0**-24,
                  2.0**-25, 1.0 + 2.0**-11], dtype=np.float32),       # overflow, subnormal, ties
    ])
    return (values.view(np.uint32) >> 16).astype(np.uint16).reshape(-1, 4)


def test_bf16_to_f32_is_exact() -> None:
    raw = _bf16_samples()
    expected = (raw.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(bf16_to_f32(raw).view(np.uint32), expected.view(np.uint32))


def test_f32_to_f16_rounds_like_numpy() -> None:
    values = np.random.default_rng(1).standard_normal((300, 999)).astype(np.float32) * 1000
    np.testing.assert_array_equal(f32_to_f16(values).view(np.uint16),
                                  values.astype(np.float16).view(np.uint16))


def test_fused_bf16_to_f16() -> None:
    raw = _bf16_samples()
    with np.errstate(over="ignore"):  # 70000 becomes inf, as intended
        expected = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
    result = bf16_to_f16(raw)
    assert result.shape == raw.shape
    np.testing.assert_array_equal(result.view(np.uint16), expected.view(np.uint16))
