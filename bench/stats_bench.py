"""How fast are engine.stats.diff_stats / tensor_stats on real stage sizes?

Peers measured in the same run:
  * loop:     a plain Python transcription of apr's compute_aprt_stage_stats (the spec);
  * fullsort: numpy with a full stable argsort for the top-K (the obvious vectorisation).

    .venv/bin/python bench/stats_bench.py [--repeat N]

Prints the median milliseconds of each and the ratios peer / ours.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from engine.stats import diff_stats, tensor_stats

CASES = {
    "lm_head logits [152064]": (152_064,),
    "ffn_gate 7x18944": (7, 18_944),
    "attn_scores 28x7x7": (28, 7, 7),
}


def loop_reference(a: np.ndarray, b: np.ndarray, limit: int) -> tuple:
    """apr's loop, element by element (f32 subtraction via numpy scalars)."""
    a_list, b_list = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    f32 = np.float32
    max_d, max_i, sum_sq, dot, na, nb = 0.0, 0, 0.0, 0.0, 0.0, 0.0
    diffs = []
    for i, (x, y) in enumerate(zip(a_list, b_list, strict=True)):
        d = float(abs(f32(x) - f32(y)))
        sum_sq += d * d
        if d > max_d:
            max_d, max_i = d, i
        dot += x * y
        na += x * x
        nb += y * y
        diffs.append((i, x, y, d))
    diffs.sort(key=lambda t: -t[3])
    rms = math.sqrt(sum_sq / len(a_list))
    return max_d, max_i, rms, dot / math.sqrt(na * nb), diffs[: max(limit, 1)]


def fullsort_peer(a: np.ndarray, b: np.ndarray, limit: int) -> tuple:
    fa, fb = a.reshape(-1), b.reshape(-1)
    d = np.abs(fa - fb)
    order = np.argsort(-d, kind="stable")[: max(limit, 1)]
    a64, b64, d64 = fa.astype(np.float64), fb.astype(np.float64), d.astype(np.float64)
    # elementwise + pairwise sums (BLAS dot is slower here: it wakes its thread pool)
    cosine = np.sum(a64 * b64) / math.sqrt(np.sum(a64 * a64) * np.sum(b64 * b64))
    return int(np.argmax(d)), math.sqrt(np.sum(d64 * d64) / d.size), cosine, order


def median_ms(function, *args, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function(*args)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'case':<26} {'ours ms':>8} {'fullsort':>9} {'loop ms':>9} {'x full':>7} {'x loop':>8}")
    for name, shape in CASES.items():
        a = rng.standard_normal(shape).astype(np.float32)
        b = (a + rng.standard_normal(shape).astype(np.float32) * 1e-3).astype(np.float32)
        ours = median_ms(diff_stats, a, b, 10, repeat=args.repeat)
        full = median_ms(fullsort_peer, a, b, 10, repeat=args.repeat)
        loop = median_ms(loop_reference, a, b, 10, repeat=max(1, args.repeat // 5))
        print(
            f"{name:<26} {ours:8.2f} {full:9.2f} {loop:9.1f} {full / ours:7.1f} {loop / ours:8.0f}"
        )
    a = rng.standard_normal(152_064).astype(np.float32)
    b = a.copy()
    b[::1000] = np.nan
    print(f"{'logits with NaN':<26} {median_ms(diff_stats, a, b, 10, repeat=args.repeat):8.2f}")
    print(f"{'tensor_stats logits':<26} {median_ms(tensor_stats, a, repeat=args.repeat):8.2f}")


if __name__ == "__main__":
    main()
