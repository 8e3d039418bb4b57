"""Block quantization the `gguf` package does not cover.

Dequantization of GGML types goes through `gguf.quants.dequantize`, except Q8_0, Q4_0 and Q4_1,
decoded here 2-3x faster (bit-identical). This module adds:
  * APR's own Q4 (dtype 128) and Q8 (dtype 129), both directions (§4.5);
  * Q4_K and Q6_K *quantizers* (gguf-py 0.19 only dequantizes K-quants), emitting blocks that are
    byte-compatible with GGML, so `gguf.quants.dequantize` — an independent implementation —
    decodes them; they choose scales from each sub-block's range (no llama.cpp-style search, so
    the error is a little above llama.cpp's, well within each type's bound);
  * per-row padded K-quant rows (GH-202): each row padded to a multiple of 256 columns.
"""

from __future__ import annotations

import functools

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

QK_K = 256
Q4_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][1]  # 144
Q6_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]  # 210
APR_Q4_BLOCK = 32
APR_Q4_BYTES = 18


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Rust's `f32::round` (ties away from zero); numpy's `round` goes to even.

    Not `floor(|x| + 0.5)`: in f32, 0.49999997 + 0.5 rounds up to 1.0. `x - trunc(x)` is exact,
    so comparing that fraction with 0.5 decides every value correctly.
    """
    truncated = np.trunc(x)
    return truncated + np.where(np.abs(x - truncated) >= 0.5, np.sign(x), 0)


# ---------------------------------------------------------------------------------------------
# APR Q8 (129): one f32 scale for the whole tensor, then one int8 per element.


def quantize_apr_q8(values: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)  # [n]
    max_abs = float(np.max(np.abs(flat))) if flat.size else 0.0
    scale = np.float32(max_abs / 127.0 if max_abs > 0 else 1.0)
    q = np.clip(round_half_away(flat / scale), -127, 127).astype(np.int8)  # [n]
    return scale.tobytes() + q.tobytes()


def dequantize_apr_q8(raw: np.ndarray, count: int) -> np.ndarray:
    """`raw`: uint8 [4 + count]."""
    scale = raw[:4].view("<f4")[0]
    return raw[4 : 4 + count].view(np.int8).astype(np.float32) * np.float32(scale)  # [count]


# ---------------------------------------------------------------------------------------------
# APR Q4 (128): per 32 values an f16 scale max|x|/7 and 16 bytes of nibbles q+8 (even element low).


def quantize_apr_q4(values: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n_blocks = -(-flat.size // APR_Q4_BLOCK)
    padded = np.zeros(n_blocks * APR_Q4_BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(n_blocks, APR_Q4_BLOCK)  # [blocks, 32]
    max_abs = np.max(np.abs(blocks), axis=1)  # [blocks]
    scale = np.where(max_abs > 0, max_abs / 7.0, 1.0).astype(np.float32)
    q = (
        np.clip(round_half_away(blocks / scale[:, None]), -8, 7).astype(np.int16) + 8
    )  # [blocks, 32]
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)  # [blocks, 16]
    out = np.empty((n_blocks, APR_Q4_BYTES), dtype=np.uint8)
    out[:, :2] = scale.astype("<f2").reshape(n_blocks, 1).view(np.uint8)
    out[:, 2:] = packed
    return out.tobytes()


def dequantize_apr_q4(raw: np.ndarray, count: int) -> np.ndarray:
    """`raw`: uint8 [ceil(count/32) * 18]. NaN, Inf and subnormal scales read as 0 (as realizar)."""
    n_blocks = -(-count // APR_Q4_BLOCK)
    blocks = raw[: n_blocks * APR_Q4_BYTES].reshape(n_blocks, APR_Q4_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32).reshape(n_blocks)  # [blocks]
    bad = ~np.isfinite(scale) | ((scale != 0) & (np.abs(scale) < np.finfo(np.float16).tiny))
    scale[bad] = 0.0
    packed = blocks[:, 2:]  # [blocks, 16]
    q = np.empty((n_blocks, APR_Q4_BLOCK), dtype=np.int8)
    q[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    q[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return (q.astype(np.float32) * scale[:, None]).reshape(-1)[:count]


def apr_q4_nbytes(count: int) -> int:
    return -(-count // APR_Q4_BLOCK) * APR_Q4_BYTES


# ---------------------------------------------------------------------------------------------
# GGML K-quant quantizers (blocks of 256).


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """GGML Q4_K blocks for `values` (size a multiple of 256): uint8 [n/256, 144]."""
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, 8, 32)  # [nb, 8 sub, 32]
    n_blocks = blocks.shape[0]
    lo = np.minimum(blocks.min(axis=2), 0.0)  # [nb, 8]
    hi = blocks.max(axis=2)
    sub_scale = (hi - lo) / 15.0  # value = scale*q - min, q in 0..15
    sub_min = -lo
    d = _f16(sub_scale.max(axis=1) / 63.0)  # [nb]
    dmin = _f16(sub_min.max(axis=1) / 63.0)
    safe_d = np.where(d > 0, d, 1.0)[:, None]
    safe_dmin = np.where(dmin > 0, dmin, 1.0)[:, None]
    sc = np.clip(np.rint(sub_scale / safe_d), 0, 63).astype(np.uint8)  # [nb, 8]
    mn = np.clip(np.rint(sub_min / safe_dmin), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[:, :, None]  # [nb, 8, 1]
    offset = (dmin[:, None] * mn)[:, :, None]
    q = np.where(step > 0, np.rint((blocks + offset) / np.where(step > 0, step, 1.0)), 0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n_blocks, 4, 2, 32)  # [nb, chunk, lo/hi, 32]

    scales = np.empty((n_blocks, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n_blocks, 128)

    out = np.empty((n_blocks, Q4_K_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").reshape(n_blocks, 1).view(np.uint8)
    out[:, 2:4] = dmin.astype("<f2").reshape(n_blocks, 1).view(np.uint8)
    out[:, 4:16] = scales
    out[:, 16:] = qs
    return out


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """GGML Q6_K blocks for `values` (size a multiple of 256): uint8 [n/256, 210]."""
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, 16, 16)  # [nb, 16 sub, 16]
    n_blocks = blocks.shape[0]
    sub_scale = np.abs(blocks).max(axis=2) / 31.0  # [nb, 16]; value = d*sc*(q-32), q-32 in -31..31
    d = _f16(sub_scale.max(axis=1) / 127.0)  # [nb]
    sc = np.clip(np.rint(sub_scale / np.where(d > 0, d, 1.0)[:, None]), 0, 127).astype(np.int8)
    step = (d[:, None] * sc)[:, :, None]  # [nb, 16, 1]
    q = np.where(step > 0, np.rint(blocks / np.where(step > 0, step, 1.0)), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n_blocks, 2, 4, 32)  # [nb, half, k, l]

    ql = np.empty((n_blocks, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4)
    ql[:, :, 32:64] = (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)
    qh = (
        (q[:, :, 0] >> 4)
        | ((q[:, :, 1] >> 4) << 2)
        | ((q[:, :, 2] >> 4) << 4)
        | ((q[:, :, 3] >> 4) << 6)
    )

    out = np.empty((n_blocks, Q6_K_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(n_blocks, 128)
    out[:, 128:192] = qh.reshape(n_blocks, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.astype("<f2").reshape(n_blocks, 1).view(np.uint8)
    return out


K_QUANTIZERS = {
    GGMLQuantizationType.Q4_K: quantize_q4_k,
    GGMLQuantizationType.Q6_K: quantize_q6_k,
}


def quantize_ggml(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGML blocks of `values` (last dim a multiple of the block size) as uint8 [rows, bytes]."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype in K_QUANTIZERS:
        rows = values.reshape(-1, values.shape[-1])
        blocks = K_QUANTIZERS[qtype](rows)
        return blocks.reshape(rows.shape[0], -1)
    return gguf_quants.quantize(values.reshape(-1, values.shape[-1]), qtype)


def quantize_k_rows_padded(values: np.ndarray, qtype: GGMLQuantizationType) -> bytes:
    """APR's GH-202 layout: each row of a 2-D tensor zero-padded to a multiple of 256 columns."""
    rows, cols = values.shape
    padded_cols = -(-cols // QK_K) * QK_K
    padded = np.zeros((rows, padded_cols), dtype=np.float32)  # [rows, padded_cols]
    padded[:, :cols] = values
    return quantize_ggml(padded, qtype).tobytes()


@functools.cache
def can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf-py decodes `qtype` (it lacks some, e.g. Q8_K and several IQ types)."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    try:
        gguf_quants.dequantize(np.zeros((1, nbytes), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """[nb, 34] -> [nb, 32]: f16 d, 32 int8."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= d
    return out


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """[nb, 18] -> [nb, 32]: f16 d, 16 bytes; low nibbles are values 0..15, high 16..31; q - 8."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    out = _nibbles(blocks[:, 2:18])
    out -= 8
    out *= d
    return out


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """[nb, 20] -> [nb, 32]: f16 d, f16 m, 16 bytes of nibbles; d*q + m."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    out = _nibbles(blocks[:, 4:20])
    out *= d
    out += m
    return out


def _nibbles(qs: np.ndarray) -> np.ndarray:
    out = np.empty((qs.shape[0], 32), dtype=np.float32)  # [nb, 32]
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    return out


# The types real checkpoints use most, decoded in place with fewer temporaries than gguf-py's
# generic path (2-3x faster); tests check them bit for bit against gguf.quants.dequantize.
_FAST_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
}


DEQUANT_CHUNK_VALUES = 1 << 18
"""Values per `gguf.quants.dequantize` call (1 MiB of float32). On a whole tensor gguf-py holds
the output of every 16-block group and then concatenates them: twice the tensor's float32 size at
once (a 7B FFN matrix: 2 x 172 MiB), and thousands of small arrays that glibc keeps in its heap
afterwards. Decoded a chunk at a time into one preallocated array, a tensor costs one copy."""


def _gguf_py_dequantize(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """[n_blocks, block_bytes] uint8 -> [n_blocks, block] float32 with gguf-py, chunk by chunk."""
    block = GGML_QUANT_SIZES[qtype][0]
    out = np.empty((blocks.shape[0], block), dtype=np.float32)  # [n_blocks, block]
    step = max(1, DEQUANT_CHUNK_VALUES // block)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = gguf_quants.dequantize(blocks[start : start + step], qtype)
    return out


def dequantize_ggml(raw: np.ndarray, qtype: GGMLQuantizationType, count: int) -> np.ndarray:
    """`count` float32 values from GGML blocks in `raw` (uint8); the last block may be padding."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    n_blocks = -(-count // block)
    rows = np.asarray(raw[: n_blocks * nbytes]).reshape(n_blocks, nbytes)  # plain ndarray view
    if qtype in _FAST_DEQUANT:
        values = _FAST_DEQUANT[qtype](rows)
    else:
        values = _gguf_py_dequantize(rows, qtype)
    return values.reshape(-1)[:count].astype(np.float32, copy=False)


def dequantize_k_rows_padded(
    raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int
) -> np.ndarray:
    """[rows, cols] from per-row padded K-quant blocks, the padding columns dropped."""
    blocks_per_row = -(-cols // QK_K)
    nbytes = GGML_QUANT_SIZES[qtype][1]
    blocks = np.asarray(raw[: rows * blocks_per_row * nbytes]).reshape(
        rows * blocks_per_row, nbytes
    )
    full = _gguf_py_dequantize(blocks, qtype).reshape(rows, blocks_per_row * QK_K)
    return np.ascontiguousarray(full[:, :cols], dtype=np.float32)
