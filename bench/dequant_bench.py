"""Our GGML dequantizers (engine/formats/quant.py) against gguf-py's, on the same tensors.

    .venv/bin/python bench/dequant_bench.py [--types Q4_K,Q6_K] [--repeat 3]

For each type with a decoder of ours and each shape (a 7B FFN matrix 4096 x 11008 and a
SmolLM2-135M FFN matrix 576 x 1536) it builds one tensor of random valid blocks (random bytes,
f16 scales set to ordinary small values), then times, in the same run and on the same bytes:

* ours: `quant.dequantize_ggml`, the path every GGUF/APR load takes;
* gguf-py: `gguf.quants.dequantize` a chunk of `DEQUANT_CHUNK_VALUES` at a time into one
  preallocated array (the path these types took before; a whole-tensor call is no faster and
  peaks at two float32 copies).

Both include allocating the float32 output. Each is the best of `--repeat` runs, timed as CPU
time of this process (user + system, so the output's page faults count) and as wall time: the
cores here are shared, and CPU time is the figure other processes disturb least. The outputs are
checked bit for bit. Prints M values/s (CPU time) for each and the speed ratios gguf-py / ours
by CPU and by wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.formats import quant  # noqa: E402

SHAPES = ((4096, 11008), (576, 1536))

# Byte offsets of the f16 scales in each block (gguf-py's layouts).
F16_OFFSETS = {
    GGMLQuantizationType.Q8_0: (0,),
    GGMLQuantizationType.Q4_0: (0,),
    GGMLQuantizationType.Q4_1: (0, 2),
    GGMLQuantizationType.Q5_0: (0,),
    GGMLQuantizationType.Q5_1: (0, 2),
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


def random_blocks(qtype: GGMLQuantizationType, count: int, seed: int = 0) -> np.ndarray:
    """uint8 [count / block, block_bytes] of valid blocks with finite, weight-sized scales."""
    rng = np.random.default_rng(seed)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(count // block, nbytes), dtype=np.uint8)
    for offset in F16_OFFSETS[qtype]:
        scales = rng.uniform(1e-4, 1e-2, size=blocks.shape[0]).astype("<f2")
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks


def gguf_py_chunked(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    block = GGML_QUANT_SIZES[qtype][0]
    out = np.empty((blocks.shape[0], block), dtype=np.float32)  # [n_blocks, block]
    step = max(1, quant.DEQUANT_CHUNK_VALUES // block)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = gguf_quants.dequantize(blocks[start : start + step], qtype)
    return out.reshape(-1)


def best_seconds(repeat: int, decode, *args) -> tuple[float, float, np.ndarray]:
    """(best CPU seconds, best wall seconds, the last result) over `repeat` calls."""
    best_cpu, best_wall, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        del result  # free the previous output first: one float32 copy alive at a time
        cpu, wall = time.process_time(), time.perf_counter()
        result = decode(*args)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--types",
        default=",".join(qtype.name for qtype in F16_OFFSETS),
        help="comma-separated GGML type names (default: every type with a decoder of ours)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    args = parser.parse_args()
    qtypes = [GGMLQuantizationType[name.strip()] for name in args.types.split(",")]

    print(f"dequant_bench: {os.cpu_count()} cores, load average {os.getloadavg()}")
    print(
        f"{'type':6} {'shape':>12} {'ours Mv/s':>10} {'gguf-py Mv/s':>13} "
        f"{'ratio cpu':>10} {'ratio wall':>11}  equal"
    )
    for qtype in qtypes:
        for rows, cols in SHAPES:
            count = rows * cols
            blocks = random_blocks(qtype, count)
            raw = blocks.reshape(-1)
            ours_cpu, ours_wall, ours = best_seconds(
                args.repeat, quant.dequantize_ggml, raw, qtype, count
            )
            theirs_cpu, theirs_wall, theirs = best_seconds(
                args.repeat, gguf_py_chunked, blocks, qtype
            )
            equal = np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
            print(
                f"{qtype.name:6} {f'{rows}x{cols}':>12} {count / ours_cpu / 1e6:10.0f} "
                f"{count / theirs_cpu / 1e6:13.1f} {theirs_cpu / ours_cpu:9.1f}x "
                f"{theirs_wall / ours_wall:10.1f}x  {equal}"
            )
            del ours, theirs
    print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
