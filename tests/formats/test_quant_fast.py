"""Our GGML dequantizers against `gguf.quants.dequantize` (the oracle), bit for bit.

Every byte pattern is a valid block of these types (scales are f16 or 6-bit fields, values are
bit fields), so uniformly random bytes exercise every field; on top of that the f16 scales are
overwritten with the hard cases: zero, -0, subnormals, the largest finite f16, Inf and NaN.
Equality is on the float32 bit patterns; only NaN payloads may differ (both sides must be NaN in
the same places).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from engine.formats import quant
from engine.formats.quant import dequantize_ggml, dequantize_k_rows_padded, quantize_ggml

T = GGMLQuantizationType

# Byte offsets of each type's f16 scales inside a block (gguf-py's layouts, §4.5).
F16_OFFSETS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
OUR_TYPES = sorted(F16_OFFSETS, key=lambda qtype: qtype.value)

SPECIAL_F16 = np.array(
    [
        0.0,
        -0.0,
        np.float16(2.0**-24),  # smallest subnormal
        -np.float16(2.0**-24),
        np.float16(6.0e-5),  # a larger subnormal
        np.float16(2.0**-14),  # smallest normal
        65504.0,  # largest finite f16
        -65504.0,
        np.inf,
        -np.inf,
        np.nan,
        1.0,
    ],
    dtype=np.float16,
)


def _random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int) -> np.ndarray:
    """uint8 [n_blocks, block_bytes]: random bytes, a quarter of the f16 scales made special."""
    rng = np.random.default_rng(seed)
    nbytes = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for offset in F16_OFFSETS[qtype]:
        special = rng.random(n_blocks) < 0.25
        picks = rng.choice(SPECIAL_F16, size=int(special.sum()))
        blocks[special, offset : offset + 2] = picks.astype("<f2").view(np.uint8).reshape(-1, 2)
    return blocks


def _assert_bit_identical(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == expected.shape
    got_nan, expected_nan = np.isnan(got), np.isnan(expected)
    assert np.array_equal(got_nan, expected_nan), "NaN in different places"
    mismatch = got[~got_nan].view(np.uint32) != expected[~expected_nan].view(np.uint32)
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} values differ, first at flat index "
        f"{int(np.flatnonzero(~got_nan)[np.argmax(mismatch)])}"
    )


def _oracle(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_quants.dequantize(blocks, qtype).reshape(-1)


def test_every_type_here_has_our_own_decoder():
    """Guards the point of this file: these types must not fall back to gguf-py."""
    assert set(quant._FAST_DEQUANT) == set(OUR_TYPES)


@pytest.mark.parametrize("qtype", OUR_TYPES, ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("seed", range(6))
def test_random_blocks_decode_bit_identical_to_gguf_py(qtype, seed):
    # 301 blocks: not a multiple of any chunk, so the last chunk is partial.
    blocks = _random_blocks(qtype, 301, seed)
    expected = _oracle(blocks, qtype)
    with np.errstate(all="raise"):  # our decode must not warn where gguf-py's would
        got = dequantize_ggml(blocks.reshape(-1), qtype, expected.size)
    _assert_bit_identical(got, expected)


@pytest.mark.parametrize("qtype", OUR_TYPES, ids=lambda qtype: qtype.name)
def test_special_scales_really_reach_the_output(qtype):
    """The random blocks do contain Inf, NaN and subnormal-scaled outputs, so the test above
    covers them (a generator bug leaving only ordinary scales would make it weaker)."""
    expected = _oracle(_random_blocks(qtype, 301, 0), qtype)
    assert np.isnan(expected).any()
    assert np.isinf(expected).any()
    tiny = np.abs(expected[np.isfinite(expected)])
    assert ((tiny > 0) & (tiny < 1e-6)).any()


@pytest.mark.parametrize("qtype", OUR_TYPES, ids=lambda qtype: qtype.name)
def test_many_chunks_and_a_partial_last_block(qtype, monkeypatch):
    """Small chunks so a modest tensor spans many of them; `count` ends inside the last block."""
    monkeypatch.setattr(quant, "FAST_CHUNK_VALUES", 1000)
    block = GGML_QUANT_SIZES[qtype][0]
    blocks = _random_blocks(qtype, 97, 11)
    count = 96 * block + block // 2 + 1
    expected = _oracle(blocks, qtype)[:count]
    got = dequantize_ggml(blocks.reshape(-1), qtype, count)
    _assert_bit_identical(got, expected)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda qtype: qtype.name)
def test_quantized_real_values_decode_bit_identical(qtype):
    """Blocks from our quantizer (what real files hold), not just random bytes."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal((64, 512), dtype=np.float32) * np.float32(0.02)
    blocks = quantize_ggml(values, qtype).reshape(-1, GGML_QUANT_SIZES[qtype][1])
    got = dequantize_ggml(blocks.reshape(-1), qtype, values.size)
    _assert_bit_identical(got, _oracle(blocks, qtype))
    assert np.max(np.abs(got - values.reshape(-1))) < 0.02  # and it is a decode of `values`


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("cols", [256, 300, 700])
def test_padded_k_rows_drop_the_padding(qtype, cols):
    """GH-202 rows: each row padded to whole 256-value blocks; the padding columns dropped."""
    rows = 37
    blocks_per_row = -(-cols // 256)
    blocks = _random_blocks(qtype, rows * blocks_per_row, 21)
    expected = _oracle(blocks, qtype).reshape(rows, blocks_per_row * 256)[:, :cols]
    got = dequantize_k_rows_padded(blocks.reshape(-1), qtype, rows, cols)
    assert got.flags.c_contiguous
    _assert_bit_identical(got, np.ascontiguousarray(expected))


def test_types_without_our_decoder_still_use_gguf_py():
    """IQ4_NL has no decoder of ours: the chunked gguf-py path must still decode it."""
    qtype = T.IQ4_NL
    blocks = np.random.default_rng(4).integers(
        0, 256, size=(40, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8
    )
    blocks[:, 0:2] = np.float16(0.5).tobytes()[0], np.float16(0.5).tobytes()[1]
    expected = _oracle(blocks, qtype)
    _assert_bit_identical(dequantize_ggml(blocks.reshape(-1), qtype, expected.size), expected)


@pytest.mark.parametrize("qtype", OUR_TYPES, ids=lambda qtype: qtype.name)
def test_unaligned_read_only_input(qtype):
    """Tensor data from a memory map is read-only and may start at any byte offset."""
    blocks = _random_blocks(qtype, 50, 8)
    backing = np.zeros(blocks.size + 3, dtype=np.uint8)
    backing[3:] = blocks.reshape(-1)
    raw = backing[3:]  # starts 3 bytes past an aligned address
    raw.setflags(write=False)
    expected = _oracle(blocks, qtype)
    _assert_bit_identical(dequantize_ggml(raw, qtype, expected.size), expected)
    assert np.array_equal(raw, blocks.reshape(-1))  # the input is untouched


@pytest.mark.parametrize("shared", [False, True], ids=["one thread", "shared"])
def test_small_tensors_decode_on_the_caller_and_big_ones_shared(shared, monkeypatch):
    """Below PARALLEL_DECODE_MIN_VALUES a tensor never reaches engine.parallel (no thread is
    woken for it); from it on, its chunks are shared. Either way the values are gguf-py's."""
    import threading

    from engine import parallel

    qtype = T.Q4_1
    monkeypatch.setattr(quant, "FAST_CHUNK_VALUES", 1000)  # 31 blocks a chunk: 10 chunks
    monkeypatch.setattr(parallel, "PARALLEL_THREADS", 3)
    blocks = _random_blocks(qtype, 301, 5)
    values = 301 * GGML_QUANT_SIZES[qtype][0]
    monkeypatch.setattr(quant, "PARALLEL_DECODE_MIN_VALUES", values if shared else values + 1)
    jobs, threads = [], set()
    real_parallel, real_kernel = quant.parallel_chunks, quant._FAST_DEQUANT[qtype]

    def counted(work, items):
        jobs.append(len(items))
        real_parallel(work, items)

    def kernel(chunk, out):
        threads.add(threading.get_ident())
        real_kernel(chunk, out)

    monkeypatch.setattr(quant, "parallel_chunks", counted)
    monkeypatch.setitem(quant._FAST_DEQUANT, qtype, kernel)
    got = dequantize_ggml(blocks.reshape(-1), qtype, values)
    _assert_bit_identical(got, _oracle(blocks, qtype))
    assert jobs == ([10] if shared else [])
    if not shared:
        assert threads == {threading.get_ident()}
