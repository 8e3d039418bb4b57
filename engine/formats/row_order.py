"""llama.cpp's Q/K row order and HF's: the permutation GGUF writers apply and its inverse.

HF stores rotate-half RoPE rows (`i` paired with `i + hd/2`); llama.cpp's converter permutes a
Llama's Q/K rows into adjacent pairs (`2i`, `2i+1`) for its NORM RoPE. Readers undo it, writers
redo it. Its own module so that the format modules that need it (gguf, common) do not import each
other.
"""

from __future__ import annotations

import numpy as np


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp `convert_hf_to_gguf.py` permute: HF rotate-half rows -> adjacent-pair rows.

    Within each head, HF row `j*hd/2 + i` (j in {0,1}) moves to row `2i + j`.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`: GGUF row `2i + j` of each head back to HF row `j*hd/2 + i`."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
