"""Number and JSON formatting the way apr (Rust, serde_json, ryu) prints it.

Python's `%e`, `repr()` and `json.dumps` differ from Rust in small ways that matter when our
output is compared with apr's byte for byte:

* Rust `{:.6e}` prints `2.500000e-1`, `1.000000e0` (no zero padding, no `+` in the exponent);
  non-finite values print as `NaN`, `inf`, `-inf`.
* serde_json prints finite floats with ryu's layout (`1.0`, `0.0001`, `1e-7`, `1.5e21`), never
  Python's `1e-07` / `1e+16`; non-finite floats become `null`; `to_string_pretty` indents by two
  spaces and, without the `preserve_order` feature, emits object keys in sorted order.
* Under `serde_json::json!` an `f32` is widened to `f64` before printing (serde_json
  `Number::from_f32` stores `N::Float(f as f64)` unless `arbitrary_precision` is on), so
  `0.1f32` prints as `0.10000000149011612`, not `0.1`. `ryu_f32` is here for the other case.

Digits come from Python's shortest round-trip repr (f64) and numpy's Dragon4 `unique` mode
(f32); both pick the shortest digit string that reads back to the same value, as ryu does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def rust_lower_exp(value: float, precision: int = 6, *, plus: bool = False) -> str:
    """Rust's `{:.Ne}` (or `{:+.Ne}` with `plus`) for a finite or non-finite float.

    Rounding is exact and ties go to even, as in Rust >= 1.67 and Python's `%e`; an f32 passed
    as a Python float keeps its exact value, so formatting it matches Rust formatting the f32.
    """
    if math.isnan(value):
        return "NaN"
    sign = "-" if math.copysign(1.0, value) < 0 else ("+" if plus else "")
    if math.isinf(value):
        return f"{sign}inf"
    mantissa, exponent = f"{abs(value):.{precision}e}".split("e")
    return f"{sign}{mantissa}e{int(exponent)}"


def rust_fixed(value: float, precision: int) -> str:
    """Rust's `{:.N}` on a float: plain fixed point, `NaN` / `inf` / `-inf` when not finite."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{precision}f}"


def _ryu_layout(negative: bool, digits: str, kk: int, max_int: int, min_kk: int) -> str:
    """ryu's `pretty` layout of `0.DIGITS * 10^kk` (so 10^(kk-1) <= v < 10^kk).

    `max_int` is 16 for f64 and 13 for f32; `min_kk` is -5 for f64 and -6 for f32.
    """
    sign = "-" if negative else ""
    length = len(digits)
    k = kk - length
    if k >= 0 and kk <= max_int:  # 1234e7 -> 12340000000.0
        return f"{sign}{digits}{'0' * k}.0"
    if 0 < kk <= max_int:  # 1234e-2 -> 12.34
        return f"{sign}{digits[:kk]}.{digits[kk:]}"
    if min_kk < kk <= 0:  # 1234e-6 -> 0.001234
        return f"{sign}0.{'0' * -kk}{digits}"
    if length == 1:  # 1e30
        return f"{sign}{digits}e{kk - 1}"
    return f"{sign}{digits[0]}.{digits[1:]}e{kk - 1}"  # 1234e30 -> 1.234e33


def _digits_and_kk(scientific: str) -> tuple[str, int]:
    """Split a positive shortest scientific string (`1.2345e-07`, `5e+20`) into digits and kk."""
    mantissa, _, exponent = scientific.partition("e")
    digits = mantissa.replace(".", "").rstrip("0") or "0"
    return digits, int(exponent or 0) + 1


def ryu_f64(value: float) -> str:
    """serde_json / ryu text of a finite f64 (`1.0`, `0.1`, `1e-7`, `-0.0`, `1.5e300`)."""
    if not math.isfinite(value):
        raise ValueError(f"ryu formats finite values only, got {value!r}")
    negative = math.copysign(1.0, value) < 0
    if value == 0:
        return "-0.0" if negative else "0.0"
    digits, kk = _shortest_digits(np.float64(abs(value)))
    return _ryu_layout(negative, digits, kk, max_int=16, min_kk=-5)


def _shortest_digits(value: np.floating) -> tuple[str, int]:
    """Shortest round-trip digits of a positive float in its own precision, and kk."""
    scientific = np.format_float_scientific(value, unique=True, trim="-", exp_digits=1)
    return _digits_and_kk(scientific)


def ryu_f32(value: float) -> str:
    """ryu's text of a finite f32 (its own shortest digits: `0.1f32` gives `0.1`)."""
    f32 = np.float32(value)
    if not np.isfinite(f32):
        raise ValueError(f"ryu formats finite values only, got {value!r}")
    negative = bool(np.signbit(f32))
    if f32 == 0:
        return "-0.0" if negative else "0.0"
    digits, kk = _shortest_digits(abs(f32))
    return _ryu_layout(negative, digits, kk, max_int=13, min_kk=-6)


@dataclass(frozen=True)
class JsonF32:
    """A float that Rust holds as `f32`; printed as serde_json's `json!` prints it."""

    value: float


F32_WIDENED = True
"""How `JsonF32` prints: True = serde_json default (f32 widened to f64, `0.10000000149011612`);
False = ryu f32 shortest (`0.1`), which is what serde_json does with `arbitrary_precision`."""


def _json_scalar(value: object) -> str:
    import json

    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, JsonF32):
        if not math.isfinite(value.value):
            return "null"
        return ryu_f64(value.value) if F32_WIDENED else ryu_f32(value.value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return ryu_f64(float(value)) if math.isfinite(value) else "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def serde_json_pretty(value: object, _indent: str = "") -> str:
    """`serde_json::to_string_pretty` of a `json!` value: 2-space indent, keys sorted.

    Accepts dict (str keys), list/tuple, str, int, float, bool, None and JsonF32.
    """
    inner = _indent + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [
            f"{inner}{_json_scalar(str(key))}: {serde_json_pretty(value[key], inner)}"
            for key in sorted(value)
        ]
        return "{\n" + ",\n".join(items) + "\n" + _indent + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        items = [f"{inner}{serde_json_pretty(item, inner)}" for item in value]
        return "[\n" + ",\n".join(items) + "\n" + _indent + "]"
    return _json_scalar(value)
