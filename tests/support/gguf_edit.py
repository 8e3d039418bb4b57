"""Plant kernel-like bugs in a copy of a GGUF: scale some block scales of one tensor.

A quantized block's `d` (its f16 scale, the first two bytes of a Q4_0/Q4_1/Q8_0 block) multiplies
every value of the block, so multiplying a fraction of one tensor's `d` fields by a factor is what
a dequantization kernel that reads the wrong scale for some blocks would do. The original file is
never opened for writing: the edit is made on a new file (written under a temporary name, then
renamed), and the output path must not exist yet.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.formats.gguf import read_header

BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {
    "Q4_0": (18, 32),
    "Q4_1": (20, 32),
    "Q8_0": (34, 32),
}
"""GGML type → (bytes per block, values per block); in each, bytes 0..1 are the f16 scale `d`."""


@dataclass(frozen=True)
class PlantedScales:
    """What `scale_block_scales` changed."""

    path: Path
    tensor: str
    qtype: str
    blocks: np.ndarray
    """Indices (in storage order) of the blocks whose `d` was scaled, ascending."""
    total_blocks: int
    factor: float


def scale_block_scales(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tensor: str,
    *,
    fraction: float,
    factor: float,
    seed: int = 0,
) -> PlantedScales:
    """Copy `source` to `out` with `d` of round(fraction · blocks) blocks of `tensor` × factor.

    Blocks are chosen at random (without replacement) from `seed`, at least one. The new `d` is
    the f16 rounding of `d · factor`. Raises ValueError for an unknown tensor, a type without
    this block layout, or an existing `out`.
    """
    source, out = Path(source), Path(out)
    if out.exists():
        raise ValueError(f"{out}: exists; choose a new path")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction}: expected 0 < fraction <= 1")
    header = read_header(source)
    info = header.tensors.get(tensor)
    if info is None:
        raise ValueError(f"{source}: no tensor {tensor!r}")
    layout = BLOCK_LAYOUTS.get(info.qtype.name)
    if layout is None:
        raise ValueError(
            f"{tensor} is {info.qtype.name}; block scales exist in {list(BLOCK_LAYOUTS)}"
        )
    block_bytes, block_values = layout
    total = info.count // block_values
    assert total * block_bytes == info.nbytes, (info.nbytes, total)
    chosen = np.random.default_rng(seed).choice(
        total, size=max(1, math.floor(fraction * total + 0.5)), replace=False
    )
    chosen.sort()
    temp = out.with_name(f".{out.name}.partial")
    shutil.copyfile(source, temp)
    try:
        with open(temp, "r+b") as handle:
            for block in chosen:
                offset = info.start + int(block) * block_bytes
                handle.seek(offset)
                d = np.frombuffer(handle.read(2), dtype="<f2")[0]
                scaled = np.array([np.float32(d) * np.float32(factor)], dtype="<f2")
                handle.seek(offset)
                handle.write(scaled.tobytes())
        os.replace(temp, out)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return PlantedScales(out, tensor, info.qtype.name, chosen, total, float(factor))
