"""Agreement bounds between the engine's captures and the HF oracle, and the check itself.

Cosine >= 0.99999 per stage (the issue's bound) and a max relative error

    rel = max_i |engine_i - hf_i| / max_i |hf_i|

i.e. the worst element error measured against the tensor's own scale (an element-wise relative
error is meaningless for elements near zero, which every activation has).

Why 1e-5 for the tiny models: both sides compute in float32 (unit roundoff u = 2^-24 = 6e-8)
and differ only in accumulation order (numpy/OpenBLAS vs torch kernels, pairwise vs blocked
sums). A length-K dot product has a worst-case error of about K·u relative to Σ|x·w| (Higham,
γ_K), i.e. 1e-5 for the longest K = 160 here, and a typical one of about sqrt(K)·u ≈ 1e-6;
three layers of residual adds and RMSNorms keep that scale (norms divide out growth). Measured:
below 1e-6 on every stage of every tiny model, so 1e-5 leaves ten times headroom while a real
semantic slip (wrong RoPE pair, wrong GQA group, missing bias: errors of 1e-2 and up) fails it.

For the real 30-layer SmolLM2 (K up to 1536, trained weights, 30 residual layers) the same
reasoning gives a larger budget; see SMOLLM2_MAX_REL_ERR.
"""

from __future__ import annotations

import numpy as np

COSINE_MIN = 0.99999
TINY_MAX_REL_ERR = 1e-5
SMOLLM2_MAX_REL_ERR = 1e-4
"""30 layers, K up to 1536 (worst case K·u ≈ 9e-5 per matmul, typical sqrt(K)·u ≈ 2e-6), errors
carried through the residual stream; measured worst 5.4e-6 (layer 18 `attention`), so 1e-4 leaves
almost 20x headroom and is still far below what a dequantization slip (~1e-2) would produce."""

GEMMA3_MAX_REL_ERR = 1e-4
"""Gemma 3 270M on a 16-token prompt: 18 layers, K up to 2048 (worst case K·u ≈ 1.2e-4 per
matmul, typical sqrt(K)·u ≈ 3e-6); measured worst 3.0e-6 (layer 12 `attention`), so the
SmolLM2 bound leaves 30x headroom."""

GEMMA3_LONG_MAX_REL_ERR = 2e-3
"""Gemma 3 270M on a 951-token prompt. The RoPE inverse frequencies `1/θ^(2i/hd)` are float32
powers, and numpy's powf and torch's (SLEEF) round 19 of the 128 differently by one ulp (neither
is the correctly rounded value at every i: both have ~45 of 128 off by one). An ulp of
inv_freq (up to 6e-8) times position 950 shifts an angle by up to 6e-5 rad, so cos/sin (and
q/k after RoPE) differ by ~1.2e-4 of their scale at layer 0 (measured 1.14e-4 on `q_post_rope`);
18 layers carry it to a measured worst 6.5e-4 (layer 15 `post_attn_norm`), cosine still above
0.999999998. 2e-3 leaves 3x headroom and stays far below a wrong window, base or position
(errors of 1e-1 and up); the cosine bound is unchanged."""


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    denominator = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denominator) if denominator > 0 else float("nan")


def max_rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    scale = float(np.abs(expected).max())
    return float(np.abs(got.astype(np.float64) - expected).max() / scale)


def disagreements(
    got: dict[tuple[int, str], np.ndarray],
    expected: dict[tuple[int, str], np.ndarray],
    *,
    max_rel: float,
    cosine_min: float = COSINE_MIN,
) -> list[str]:
    """One line per (layer, stage) that is missing, misshapen or outside the bounds."""
    problems = []
    for key in sorted(set(got) | set(expected), key=lambda k: (k[0], k[1])):
        if key not in got or key not in expected:
            problems.append(f"{key}: only on {'engine' if key in got else 'HF'} side")
            continue
        a, b = np.asarray(got[key]), expected[key]
        if a.shape != b.shape:
            problems.append(f"{key}: shape {a.shape} vs HF {b.shape}")
            continue
        if a.dtype != np.float32:
            problems.append(f"{key}: dtype {a.dtype}")
        cos, rel = cosine(a, b), max_rel_err(a, b)
        if not cos >= cosine_min or not rel <= max_rel:
            problems.append(f"{key}: cosine {cos:.9f} max rel err {rel:.3g}")
    return problems
