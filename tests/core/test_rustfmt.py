"""engine.rustfmt: Rust `{:.6e}` / `{:.10}`, ryu (serde_json) float text, serde_json pretty JSON."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.rustfmt import (
    JsonF32,
    rust_fixed,
    rust_lower_exp,
    ryu_f32,
    ryu_f64,
    serde_json_pretty,
)


@pytest.mark.parametrize(
    ("value", "plain", "plus"),
    [
        (0.25, "2.500000e-1", "+2.500000e-1"),
        (1.0, "1.000000e0", "+1.000000e0"),
        (-2.0, "-2.000000e0", "-2.000000e0"),
        (0.0, "0.000000e0", "+0.000000e0"),
        (-0.0, "-0.000000e0", "-0.000000e0"),
        (123456.0, "1.234560e5", "+1.234560e5"),
        (12345675.0, "1.234568e7", "+1.234568e7"),  # exact tie: round half to even (7 -> 8)
        (12345665.0, "1.234566e7", "+1.234566e7"),  # exact tie: 6 stays
        (1e-10, "1.000000e-10", "+1.000000e-10"),
        (math.nan, "NaN", "NaN"),
        (math.inf, "inf", "+inf"),
        (-math.inf, "-inf", "-inf"),
    ],
)
def test_rust_lower_exp(value, plain, plus):
    assert rust_lower_exp(value) == plain
    assert rust_lower_exp(value, plus=True) == plus


def test_rust_lower_exp_of_an_f32_uses_its_exact_value():
    assert rust_lower_exp(float(np.float32(0.1))) == "1.000000e-1"
    assert rust_lower_exp(float(np.float32(0.1)), 10) == "1.0000000149e-1"


def test_rust_fixed():
    assert rust_fixed(0.9966351658188517, 10) == "0.9966351658"
    assert rust_fixed(1.0, 10) == "1.0000000000"
    assert rust_fixed(-0.0, 3) == "-0.000"
    assert (rust_fixed(math.nan, 10), rust_fixed(-math.inf, 2)) == ("NaN", "-inf")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1.0"),
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (0.1, "0.1"),
        (-2.5, "-2.5"),
        (123.456, "123.456"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e16"),
        (1.5e16, "1.5e16"),
        (0.0001, "0.0001"),
        (0.00001, "0.00001"),
        (1e-6, "1e-6"),
        (1.25e-7, "1.25e-7"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e308"),
        (float(np.float32(0.1)), "0.10000000149011612"),
    ],
)
def test_ryu_f64(value, text):
    assert ryu_f64(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1, "0.1"),
        (1.0, "1.0"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (1e12, "1000000000000.0"),
        (1e13, "1e13"),
        (3.4028234663852886e38, "3.4028235e38"),
        (1e-45, "1e-45"),
    ],
)
def test_ryu_f32(value, text):
    assert ryu_f32(value) == text


def test_ryu_rejects_non_finite():
    with pytest.raises(ValueError):
        ryu_f64(math.nan)
    with pytest.raises(ValueError):
        ryu_f32(math.inf)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_ryu_f64_round_trips_and_uses_shortest_digits(bits):
    value = struct.unpack("<d", struct.pack("<Q", bits))[0]
    if not math.isfinite(value):
        return
    text = ryu_f64(value)
    assert float(text) == value and math.copysign(1, float(text)) == math.copysign(1, value)
    digits = text.lstrip("-").split("e")[0].replace(".", "").strip("0")
    shortest = repr(abs(value)).split("e")[0].replace(".", "").strip("0")
    assert digits == shortest


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_ryu_f32_round_trips_in_f32(bits):
    value = np.array([bits], np.uint32).view(np.float32)[0]
    if not np.isfinite(value):
        return
    assert np.float32(float(ryu_f32(float(value)))) == value


def test_serde_json_pretty_layout_sorted_keys_and_nulls():
    text = serde_json_pretty(
        {
            "schema": "x",
            "b": [{"z": 1, "a": JsonF32(0.5)}],
            "a": math.nan,
            "empty": [],
            "obj": {},
            "t": True,
            "s": 'q"\n\u00e9',
            "f": JsonF32(float(np.float32(0.1))),
            "inf": JsonF32(math.inf),
        }
    )
    assert text == (
        "{\n"
        '  "a": null,\n'
        '  "b": [\n'
        "    {\n"
        '      "a": 0.5,\n'
        '      "z": 1\n'
        "    }\n"
        "  ],\n"
        '  "empty": [],\n'
        '  "f": 0.10000000149011612,\n'
        '  "inf": null,\n'
        '  "obj": {},\n'
        '  "s": "q\\"\\n\u00e9",\n'
        '  "schema": "x",\n'
        '  "t": true\n'
        "}"
    )
    assert json.loads(text)["f"] == float(np.float32(0.1))
