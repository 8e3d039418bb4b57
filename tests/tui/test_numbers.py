"""One number format everywhere (issue 10, item 8): the grid, the token strip and `bisect`."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from aprtui.numbers import cosine_text, short_number


def decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1.0000"),
        (0.99995, "1.0000"),
        (0.99994, "0.9999"),
        (0.0747, "0.0747"),
        (-0.054, "-.0540"),
        (-0.99994, "-.9999"),
        (0.0, "0.0000"),
        (-0.00001, "0.0000"),
    ],
)
def test_cosine_has_four_decimals_whatever_its_sign(value, expected):
    assert cosine_text(value) == expected
    assert len(expected) <= 6


def test_negative_and_positive_numbers_keep_the_same_decimals():
    for magnitude in (0.0747, 0.054, 0.5, 3.25, 12.5, 123.4):
        positive, negative = short_number(magnitude), short_number(-magnitude)
        assert decimals(positive) == decimals(negative), (positive, negative)
        assert len(negative) <= 6
    assert short_number(-0.054) == "-.0540"
    assert short_number(0.054) == "0.0540"


def test_bisect_table_prints_cosines_as_the_grid_does(apr_tui, tmp_path):
    """`bisect` on the small demo pair: every cosine in its table has four decimals and a
    leading digit (`1.0000`, never `1.0` or `.9999`)."""
    from engine.demo import build_small_demo

    pair = build_small_demo(tmp_path)
    result = subprocess.run(
        [*apr_tui, "bisect", str(pair.model_a), str(pair.model_b)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    assert result.returncode == 1, result.stderr  # the pair's planted defect is found
    assert "1.0000" in result.stdout
    assert not re.search(r"(?<![\w.])1\.0(?![\d])", result.stdout)
    assert not re.search(r"(?<![\w\d-])\.\d{4}", result.stdout)
