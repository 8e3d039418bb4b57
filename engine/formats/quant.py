"""Block quantization: GGML decoders of our own, APR's Q4/Q8, and the K-quant quantizers.

Dequantization of GGML types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K
are decoded here, bit-identical to `gguf.quants.dequantize` and 5-30x faster
(bench/dequant_bench.py); every other type goes through `gguf.quants.dequantize`. Either way a
tensor is decoded in bounded chunks into one preallocated float32 array. This module adds:
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

from engine.formats.ggml_types import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from engine.parallel import parallel_chunks

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
    from gguf import quants as gguf_quants

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
    """Whether `qtype` can be decoded: by one of our kernels, or by gguf-py (which lacks some,
    e.g. Q8_K and several IQ types; asked only for those, so that opening a model of the common
    types never imports the `gguf` package)."""
    if qtype in _FAST_DEQUANT:
        return True
    block, nbytes = GGML_QUANT_SIZES[qtype]
    try:
        from gguf import quants as gguf_quants

        gguf_quants.dequantize(np.zeros((1, nbytes), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# GGML dequantizers. Each kernel decodes a chunk of blocks, uint8 [n, block_bytes], into its
# slice of the preallocated output, float32 [n, block_values], bit for bit as
# `gguf.quants.dequantize`: the same float32 operations in the same order (`d * sc` rounded to
# float32 first, then `* q`, then `- dmin * m`; numpy never fuses them into an FMA). Most of
# these products are exact anyway (an f16 times a 6-bit integer times a 4-bit one fits in
# float32's 24-bit mantissa), so what must match is each rounding step that is not, and every
# Inf / NaN / subnormal case; tests/formats/test_quant_fast.py checks all ten types on random
# blocks. Per-block fields are unpacked on transposed header rows (long contiguous loops), bit
# fields eight bytes at a time in uint64 lanes, and the float work runs on a chunk small enough
# to stay in cache across its passes; gguf-py instead builds a dozen full-size temporaries per
# 16-block group.


def _records(blocks: np.ndarray, fields: np.dtype) -> np.ndarray:
    """Blocks [n, block_bytes] uint8 as n records of `fields` (a view when contiguous): a field
    is then one strided [n] array, so a per-block header converts in a single loop of n, not n
    loops of 2 bytes, and a 16- or 32-byte field copies out as n whole items."""
    return np.ascontiguousarray(blocks).reshape(-1).view(fields)


def _nibble_halves(qs: np.ndarray) -> np.ndarray:
    """A [n] 16-byte field of nibbles -> uint8 [n, 32]: byte j's low nibble is value j, its
    high nibble value 16 + j (Q4_0, Q4_1, Q5_0, Q5_1). Unpacked eight bytes at a time in
    contiguous uint64 lanes and written back as whole 16-byte halves: every step is one loop
    over the chunk (per-block loops of 16 values cost four times as much)."""
    n = qs.shape[0]
    lanes = np.ascontiguousarray(qs).view(np.uint64)  # [2n]
    halves = np.empty((n, 2), dtype="V16")  # [n, lo/hi]
    nibbles = lanes & _LOW_NIBBLES
    halves[:, 0] = nibbles.view("V16")
    np.right_shift(lanes, np.uint64(4), out=nibbles)
    nibbles &= _LOW_NIBBLES
    halves[:, 1] = nibbles.view("V16")
    return halves.view(np.uint8).reshape(n, 32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K packed 6-bit scales and mins, transposed: [12, n] uint8 -> two uint8 [8, n].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high).
    Transposed so each operation runs over n contiguous bytes, not n runs of 4."""
    sc_lo, mn_lo, both_hi = scales[0:4], scales[4:8], scales[8:12]
    sc = np.empty((8, scales.shape[1]), dtype=np.uint8)  # [8, n]
    mn = np.empty((8, scales.shape[1]), dtype=np.uint8)
    np.bitwise_and(sc_lo, 0x3F, out=sc[0:4])
    np.bitwise_or(both_hi & 0x0F, (sc_lo >> 2) & 0x30, out=sc[4:8])
    np.bitwise_and(mn_lo, 0x3F, out=mn[0:4])
    np.bitwise_or(both_hi >> 4, (mn_lo >> 2) & 0x30, out=mn[4:8])
    return sc, mn


def _header_rows(blocks: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bytes start..stop of every block, transposed to [stop - start, n] contiguous rows."""
    return np.ascontiguousarray(blocks[:, start:stop].T)


def _f16_row(rows: np.ndarray, i: int) -> np.ndarray:
    """[n] float32 from the little-endian f16 in transposed header rows i (low) and i + 1."""
    bits = rows[i + 1].astype(np.uint16)
    bits <<= 8
    bits |= rows[i]
    return bits.view(np.float16).astype(np.float32)


def _lanes(blocks: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bytes start..stop of every block as uint64 [n, (stop - start) / 8]: bit fields that never
    cross a byte are unpacked eight bytes per operation (a mask per byte keeps shifted-in bits
    of the neighbouring byte out), which makes the unpacking almost free."""
    return np.ascontiguousarray(blocks[:, start:stop]).view(np.uint64)


def _per_value(per_group: np.ndarray, width: int) -> np.ndarray:
    """[groups, n] float32 -> [n, groups * width]: each group's factor repeated over its values.
    A full-size operand makes the multiply a plain contiguous loop; broadcasting a [n, g, 1]
    operand runs numpy's inner loop 16 or 32 values at a time, twice as slow in total."""
    return np.repeat(per_group.T, width, axis=1)


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_LOW_2BITS = np.uint64(0x0303030303030303)
_LOW_BIT = np.uint64(0x0101010101010101)
_SHIFT_2BIT_LANES = np.array([0, 2, 4, 6], dtype=np.uint64).reshape(1, 1, 4, 1)
_SHIFT_1BIT_LANES = np.arange(8, dtype=np.uint64).reshape(1, 8, 1)
_SHIFT_2BIT_ROWS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1, 1)


_Q8_0 = np.dtype([("d", "<f2"), ("qs", "V32")])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "V16")])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "V16")])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "V4"), ("qs", "V16")])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "V4"), ("qs", "V16")])


def _dequantize_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """34 bytes -> 32 values: f16 d, 32 int8; q * d."""
    rec = _records(blocks, _Q8_0)  # [n]
    d = rec["d"].astype(np.float32)[None, :]  # [1, n]
    q = np.ascontiguousarray(rec["qs"]).view(np.int8)  # [32 n]: one loop, not n of 32
    np.copyto(out, q.reshape(out.shape), casting="unsafe")
    out *= _per_value(d, 32)


def _dequantize_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """18 bytes -> 32 values: f16 d, 16 bytes; low nibbles are values 0..15, high 16..31;
    d * (q - 8)."""
    rec = _records(blocks, _Q4_0)
    d = rec["d"].astype(np.float32)[None, :]  # [1, n]
    q = _nibble_halves(rec["qs"])  # [n, 32]
    q -= 8  # wraps below 0; read as int8 it is q - 8
    np.copyto(out, q.view(np.int8), casting="unsafe")
    out *= _per_value(d, 32)


def _dequantize_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    """20 bytes -> 32 values: f16 d, f16 m, 16 bytes of nibbles; d * q + m."""
    rec = _records(blocks, _Q4_1)
    d = rec["d"].astype(np.float32)[None, :]  # [1, n]
    m = rec["m"].astype(np.float32)[None, :]
    np.copyto(out, _nibble_halves(rec["qs"]), casting="unsafe")
    out *= _per_value(d, 32)
    out += _per_value(m, 32)


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 5-bit values, uint8 [n, 32]: the nibbles of the 16-byte field `qs` [n]
    (low: values 0..15) plus bit i of the little-endian 32-bit 4-byte field `qh` [n] as bit 4
    of value i."""
    n = qs.shape[0]
    q = _nibble_halves(qs)  # [n, 32]
    bits = np.ascontiguousarray(qh).view(np.uint8).reshape(n, 4)
    high = np.unpackbits(bits, axis=1, bitorder="little")  # [n, 32]: bit i of the uint32
    high <<= 4
    q |= high
    return q


def _dequantize_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """22 bytes -> 32 values: f16 d, 4 bytes high bits, 16 bytes nibbles; d * (q - 16)."""
    rec = _records(blocks, _Q5_0)
    d = rec["d"].astype(np.float32)[None, :]  # [1, n]
    q = _q5_values(rec["qh"], rec["qs"])
    q -= 16
    np.copyto(out, q.view(np.int8), casting="unsafe")
    out *= _per_value(d, 32)


def _dequantize_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    """24 bytes -> 32 values: f16 d, f16 m, 4 bytes high bits, 16 bytes nibbles; d * q + m."""
    rec = _records(blocks, _Q5_1)
    d = rec["d"].astype(np.float32)[None, :]  # [1, n]
    m = rec["m"].astype(np.float32)[None, :]
    q = _q5_values(rec["qh"], rec["qs"])
    np.copyto(out, q, casting="unsafe")
    out *= _per_value(d, 32)
    out += _per_value(m, 32)


def _dequantize_q2_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """84 bytes -> 256 values: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of
    2-bit values (byte l of each 32-byte half holds values l, l+32, l+64, l+96 of that half),
    f16 d, f16 dmin; (d * sc) * q - (dmin * m) per 16 values."""
    n = blocks.shape[0]
    packed = _header_rows(blocks, 0, 16)  # [16, n]
    dd = _header_rows(blocks, 80, 84)  # [4, n]
    scale = _f16_row(dd, 0) * (packed & 0x0F).astype(np.float32)  # [16, n]
    offset = _f16_row(dd, 2) * (packed >> 4).astype(np.float32)
    q = _lanes(blocks, 16, 80).reshape(n, 2, 1, 4) >> _SHIFT_2BIT_LANES  # [n, half, s, lanes]
    q &= _LOW_2BITS
    np.copyto(out, q.view(np.uint8).reshape(n, QK_K), casting="unsafe")
    out *= _per_value(scale, 16)
    out -= _per_value(offset, 16)


def _dequantize_q3_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """110 bytes -> 256 values: 32 bytes hmask (bit j of byte l: high bit of value 32j + l),
    64 bytes of 2-bit values (as Q2_K), 12 bytes of 6-bit signed scales, f16 d;
    (d * (sc - 32)) * (q2 - 4 * (1 - hbit)) per 16 values."""
    n = blocks.shape[0]
    header = _header_rows(blocks, 96, 110)  # [14, n]
    # Scale i: low 4 bits from byte i % 8 (low nibble for i < 8), high 2 bits from byte
    # 8 + i % 4, bits 2 * (i // 4).
    sc = np.empty((16, n), dtype=np.uint8)  # [16, n]
    np.bitwise_and(header[0:8], 0x0F, out=sc[0:8])
    np.right_shift(header[0:8], 4, out=sc[8:16])
    high = header[None, 8:12] >> _SHIFT_2BIT_ROWS  # [4, 4, n]
    high &= 0x03
    high <<= 4
    sc |= high.reshape(16, n)
    sc -= 32  # read as int8: sc - 32
    scale = _f16_row(header, 12) * sc.view(np.int8).astype(np.float32)  # [16, n]
    q = _lanes(blocks, 32, 96).reshape(n, 2, 1, 4) >> _SHIFT_2BIT_LANES  # [n, half, s, lanes]
    q &= _LOW_2BITS
    hbit = _lanes(blocks, 0, 32).reshape(n, 1, 4) >> _SHIFT_1BIT_LANES  # [n, 32j + l: j, lanes]
    hbit &= _LOW_BIT
    hbit <<= np.uint64(2)
    by_eighth = q.reshape(n, 8, 4)  # a view: value group j = 4 * half + s
    by_eighth |= hbit
    values = q.view(np.uint8).reshape(n, QK_K)
    values -= 4  # q2 + 4 * hbit - 4, read as int8
    np.copyto(out, values.view(np.int8), casting="unsafe")
    out *= _per_value(scale, 16)


def _k_scales_offsets(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K per-sub-block factors, float32 [8, n] each: d * sc and dmin * m, the same
    products gguf-py forms (f16 d widened to float32, times the 6-bit field as float32)."""
    header = _header_rows(blocks, 0, 16)  # [16, n]
    d = _f16_row(header, 0)  # [n]
    dmin = _f16_row(header, 2)
    sc, mn = _k_scale_min(header[4:16])  # [8, n]
    return d * sc.astype(np.float32), dmin * mn.astype(np.float32)


def _dequantize_q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """144 bytes -> 256 values: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
    nibbles (32-byte chunk c: low nibbles are sub-block 2c, high 2c+1);
    (d * sc) * q - (dmin * m) per 32 values."""
    n = blocks.shape[0]
    scale, offset = _k_scales_offsets(blocks)  # [8, n]
    qs = _lanes(blocks, 16, 144).reshape(n, 4, 4)  # [n, chunk, 32 bytes as 4 lanes]
    q = np.empty((n, 4, 2, 4), dtype=np.uint64)  # [n, chunk, lo/hi, lanes]
    np.bitwise_and(qs, _LOW_NIBBLES, out=q[:, :, 0])
    np.right_shift(qs, np.uint64(4), out=q[:, :, 1])
    q[:, :, 1] &= _LOW_NIBBLES
    np.copyto(out, q.view(np.uint8).reshape(n, QK_K), casting="unsafe")
    out *= _per_value(scale, 32)
    out -= _per_value(offset, 32)


def _dequantize_q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """176 bytes -> 256 values: as Q4_K plus 32 bytes qh after the scales (bit j of byte l is
    bit 4 of value l of sub-block j); (d * sc) * q - (dmin * m) per 32 values."""
    n = blocks.shape[0]
    scale, offset = _k_scales_offsets(blocks)
    qs = _lanes(blocks, 48, 176).reshape(n, 4, 4)
    q = np.empty((n, 4, 2, 4), dtype=np.uint64)
    np.bitwise_and(qs, _LOW_NIBBLES, out=q[:, :, 0])
    np.right_shift(qs, np.uint64(4), out=q[:, :, 1])
    q[:, :, 1] &= _LOW_NIBBLES
    high = _lanes(blocks, 16, 48).reshape(n, 1, 4) >> _SHIFT_1BIT_LANES  # [n, sub-block, lanes]
    high &= _LOW_BIT
    high <<= np.uint64(4)
    by_sub_block = q.reshape(n, 8, 4)  # a view: sub-block 2c + lo/hi
    by_sub_block |= high
    np.copyto(out, q.view(np.uint8).reshape(n, QK_K), casting="unsafe")
    out *= _per_value(scale, 32)
    out -= _per_value(offset, 32)


def _dequantize_q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """210 bytes -> 256 values: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8
    scales, f16 d; (d * sc) * (q - 32) per 16 values. In each 128-value half, value 32s + l
    takes its low 4 bits from byte l (s = 0, 2) or 32 + l (s = 1, 3) of the half's 64 ql bytes
    (low nibble for s < 2) and its high 2 bits from bits 2s of byte l of the half's 32 qh bytes."""
    n = blocks.shape[0]
    header = _header_rows(blocks, 192, 210)  # [18, n]
    scale = _f16_row(header, 16) * header[0:16].view(np.int8).astype(np.float32)  # [16, n]
    ql = _lanes(blocks, 0, 128).reshape(n, 2, 2, 4)  # [n, half, byte l or 32 + l, lanes]
    qh = _lanes(blocks, 128, 192).reshape(n, 2, 1, 4)
    q = np.empty((n, 2, 4, 4), dtype=np.uint64)  # [n, half, s, lanes]
    np.bitwise_and(ql, _LOW_NIBBLES, out=q[:, :, 0:2])
    np.right_shift(ql, np.uint64(4), out=q[:, :, 2:4])
    q[:, :, 2:4] &= _LOW_NIBBLES
    high = qh >> _SHIFT_2BIT_LANES  # [n, half, s, lanes]
    high &= _LOW_2BITS
    high <<= np.uint64(4)
    q |= high
    values = q.view(np.uint8).reshape(n, QK_K)
    values -= 32  # read as int8: q - 32 (bytewise, so not in the 64-bit lanes)
    np.copyto(out, values.view(np.int8), casting="unsafe")
    out *= _per_value(scale, 16)


# Our decoders, tested bit for bit against gguf.quants.dequantize (tests/formats/
# test_quant_fast.py) and 5-30x faster (bench/dequant_bench.py); other types go to gguf-py.
_FAST_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q5_0: _dequantize_q5_0,
    GGMLQuantizationType.Q5_1: _dequantize_q5_1,
    GGMLQuantizationType.Q2_K: _dequantize_q2_k,
    GGMLQuantizationType.Q3_K: _dequantize_q3_k,
    GGMLQuantizationType.Q4_K: _dequantize_q4_k,
    GGMLQuantizationType.Q5_K: _dequantize_q5_k,
    GGMLQuantizationType.Q6_K: _dequantize_q6_k,
}

FAST_CHUNK_VALUES = 1 << 18
"""Values per call of one of our kernels (1 MiB of float32): the chunk and its uint8
temporaries stay in L2 across the kernel's three or four passes over it, and the per-call
overhead of its dozen small per-block ufuncs is spread over 1024 K-quant blocks (measured:
throughput flat from 128 Ki to 512 Ki values, falling below 64 Ki)."""

DEQUANT_CHUNK_VALUES = 1 << 18
"""Values per `gguf.quants.dequantize` call (1 MiB of float32). On a whole tensor gguf-py holds
the output of every 16-block group and then concatenates them: twice the tensor's float32 size at
once (a 7B FFN matrix: 2 x 172 MiB), and thousands of small arrays that glibc keeps in its heap
afterwards. Decoded a chunk at a time into one preallocated array, a tensor costs one copy."""


PARALLEL_DECODE_MIN_VALUES = 1 << 22
"""Values (4 Mi: 16 MiB of float32, ~7 ms of decoding on one core) from which a tensor's chunks
are shared among threads (engine.parallel); a smaller tensor is decoded on the calling thread.
Handing work to another thread wakes it, and on a virtual machine whose host is busy a wake-up
costs far more than on bare metal (the sleeping virtual CPU must be scheduled again). Measured on
the 2-core development VM, whole-process `apr-tui trace` of SmolLM2 (37 tokens, all stages,
writes inline; min of 6 interleaved runs, host steal 25%): every matrix decoded on two threads
1.85 s wall, 1.62 s CPU, 2,435 voluntary context switches; on one thread 1.50 s, 1.46 s, 1.
SmolLM2's layer matrices (≤ 0.9 Mi values) are decoded on one thread, its 28 Mi-value embedding
table (the tied lm_head) and a 7B model's matrices (16-45 Mi values) on all."""


def _gguf_py_kernel(qtype: GGMLQuantizationType):
    from gguf import quants as gguf_quants  # the reference decoders: only for these types

    def kernel(blocks: np.ndarray, out: np.ndarray) -> None:
        out[...] = gguf_quants.dequantize(blocks, qtype)

    return kernel


def _decode_chunks(
    kernel, blocks: np.ndarray, out: np.ndarray, starts: range | list[int], step: int
) -> None:
    """Run `kernel` over the chunks of `blocks` that begin at `starts`, into `out`."""
    with np.errstate(over="ignore", invalid="ignore"):  # Inf / NaN scales decode as gguf-py's
        for start in starts:
            kernel(blocks[start : start + step], out[start : start + step])


def _dequantize_blocks_into(
    blocks: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray
) -> None:
    """Decode blocks [n, block_bytes] uint8 into `out` [n, block_values] float32, chunk by chunk;
    a tensor of PARALLEL_DECODE_MIN_VALUES or more is shared among engine.parallel's threads."""
    block = GGML_QUANT_SIZES[qtype][0]
    kernel = _FAST_DEQUANT.get(qtype)
    if kernel is None:
        kernel, step = _gguf_py_kernel(qtype), max(1, DEQUANT_CHUNK_VALUES // block)
    else:
        step = max(1, FAST_CHUNK_VALUES // block)
    starts = range(0, blocks.shape[0], step)
    if blocks.shape[0] * block < PARALLEL_DECODE_MIN_VALUES:
        _decode_chunks(kernel, blocks, out, starts, step)
        return
    parallel_chunks(lambda some: _decode_chunks(kernel, blocks, out, some, step), list(starts))


def dequantize_blocks(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """[n_blocks, block_bytes] uint8 -> [n_blocks, block_values] float32 (one allocation)."""
    out = np.empty((blocks.shape[0], GGML_QUANT_SIZES[qtype][0]), dtype=np.float32)
    _dequantize_blocks_into(blocks, qtype, out)
    return out


def dequantize_ggml(raw: np.ndarray, qtype: GGMLQuantizationType, count: int) -> np.ndarray:
    """`count` float32 values from GGML blocks in `raw` (uint8); the last block may be padding."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    n_blocks = -(-count // block)
    rows = np.asarray(raw[: n_blocks * nbytes]).reshape(n_blocks, nbytes)  # plain ndarray view
    return dequantize_blocks(rows, qtype).reshape(-1)[:count]


def ggml_row_nbytes(qtype: GGMLQuantizationType, cols: int) -> int | None:
    """Bytes of one row of a row-major [rows, cols] GGML block tensor, or None when a row does not
    end on a block boundary (cols not a multiple of the block size), so rows cannot be sliced."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return None if cols % block else cols // block * block_bytes


def dequantize_k_rows_padded(
    raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int
) -> np.ndarray:
    """[rows, cols] from per-row padded K-quant blocks, the padding columns dropped.

    Decoded a band of rows at a time into a scratch buffer and copied into the [rows, cols]
    output, so a padded tensor also costs one float32 copy, not a padded copy plus a slice."""
    blocks_per_row = -(-cols // QK_K)
    nbytes = GGML_QUANT_SIZES[qtype][1]
    blocks = np.asarray(raw[: rows * blocks_per_row * nbytes]).reshape(rows, blocks_per_row, nbytes)
    if cols == blocks_per_row * QK_K:
        return dequantize_blocks(blocks.reshape(-1, nbytes), qtype).reshape(rows, cols)
    out = np.empty((rows, cols), dtype=np.float32)  # [rows, cols]
    band = max(1, DEQUANT_CHUNK_VALUES // (blocks_per_row * QK_K))
    scratch = np.empty((band * blocks_per_row, QK_K), dtype=np.float32)  # [band blocks, 256]
    for start in range(0, rows, band):
        band_blocks = blocks[start : start + band].reshape(-1, nbytes)
        decoded = scratch[: band_blocks.shape[0]]
        _dequantize_blocks_into(band_blocks, qtype, decoded)
        out[start : start + band] = decoded.reshape(-1, blocks_per_row * QK_K)[:, :cols]
    return out
