"""Numerics found wrong in review: rounding in APR's own quantizers, JSON and file helpers."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from engine.errors import TokenizerError
from engine.fileio import atomic_output, loads_json, open_regular
from engine.formats.quant import (
    dequantize_apr_q4,
    dequantize_apr_q8,
    quantize_apr_q4,
    quantize_apr_q8,
    round_half_away,
)
from engine.tokenizer import parse_token_ids

JUST_BELOW_HALF = np.float32(0.49999997)  # 0.5 - 2**-25, the largest f32 below 0.5


def test_just_below_half_is_0x3effffff():
    assert JUST_BELOW_HALF.view(np.uint32) == 0x3EFFFFFF


def test_round_half_away_matches_rust_f32_round():
    """Rust's f32::round: ties away from zero, everything else to the nearest integer.
    `floor(|x| + 0.5)` gave 1 for 0.49999997, because 0.49999997 + 0.5 rounds to 1.0 in f32."""
    x = np.array(
        [JUST_BELOW_HALF, -JUST_BELOW_HALF, 0.5, -0.5, 1.5, 2.5, -2.5, 1.4999999, 0.0, 7.5, 1e30],
        dtype=np.float32,
    )
    expected = [0.0, 0.0, 1.0, -1.0, 2.0, 3.0, -3.0, 1.0, 0.0, 8.0, 1e30]
    rounded = round_half_away(x)
    assert rounded.dtype == np.float32
    np.testing.assert_array_equal(rounded, np.array(expected, dtype=np.float32))


def test_apr_q8_quantizes_just_below_half_to_zero():
    """max|x| = 127 gives scale 1.0 exactly, so 0.49999997 must become q = 0 (it was 1)."""
    raw = quantize_apr_q8(np.array([127.0, JUST_BELOW_HALF, -JUST_BELOW_HALF], dtype=np.float32))
    assert raw[:4] == np.float32(1.0).tobytes()
    assert list(np.frombuffer(raw[4:], dtype=np.int8)) == [127, 0, 0]
    values = dequantize_apr_q8(np.frombuffer(raw, dtype=np.uint8), 3)
    assert values.tolist() == [127.0, 0.0, 0.0]


def test_apr_q4_quantizes_just_below_half_to_zero():
    """max|x| = 7 gives scale 1.0; element 1 (the high nibble of byte 0) must hold 0 + 8."""
    block = np.zeros(32, dtype=np.float32)
    block[0], block[1] = 7.0, JUST_BELOW_HALF
    raw = quantize_apr_q4(block)
    assert raw[:2] == np.float16(1.0).tobytes()
    assert raw[2] == (7 + 8) | ((0 + 8) << 4)  # 0x8F; the old rounding gave 0x9F
    values = dequantize_apr_q4(np.frombuffer(raw, dtype=np.uint8), 32)
    assert values[:2].tolist() == [7.0, 0.0]


# ----------------------------------------------------------------------------- engine.fileio


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 100_000, "nested too deeply"),
        ("1" * 5000, "Exceeds the limit (4300 digits) for integer string conversion"),
    ],
    ids=["deep", "huge-int"],
)
def test_loads_json_turns_parser_limits_into_decode_errors(text, reason):
    with pytest.raises(json.JSONDecodeError) as caught:
        loads_json(text)
    assert str(caught.value) == reason


def test_loads_json_keeps_ordinary_errors_and_values():
    assert loads_json('{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    with pytest.raises(json.JSONDecodeError, match=r"line 1 column 3 \(char 2\)"):
        loads_json("[1")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo (POSIX) needed")
def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            open_regular(fifo)
        except OSError as error:
            outcome.append(error)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "open_regular blocked on a FIFO"
    assert str(outcome[0]) == f"[Errno 22] not a regular file: '{fifo}'"


def test_open_regular_names_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError):
        open_regular(tmp_path)


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_output(target) as temp:
        temp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_output_creates_with_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "out.bin") as temp:
            temp.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "text",
    ["4294967296", "1" * 5000, "7,99999999999999999999"],
    ids=["2**32", "5000-digits", "2nd"],
)
def test_parse_token_ids_refuses_ids_beyond_u32(text):
    with pytest.raises(TokenizerError, match=r"is too large for a token id \(max 4294967295\)"):
        parse_token_ids(text)


def test_parse_token_ids_keeps_the_largest_u32_and_leading_zeros():
    assert parse_token_ids("4294967295, 0007") == [4294967295, 7]
