"""The per-token strip at any length: short prompts keep one line pair, long ones wrap in line
pairs of 10 cells and, past 100 cells, bin positions (each bin shows its worst value), with the
worst positions listed by their token text."""

from __future__ import annotations

import numpy as np

from aprtui.widgets.token_strip import strip_text


def test_short_strip_is_one_line_pair():
    text = strip_text(
        np.array([1.0, 0.5, 0.99999]), cosine=True, threshold=0.999, token_labels=["a", "bb", "c"]
    ).plain
    labels, values = text.split("\n")
    assert labels == "      a     bb      c"
    assert len(values) == 21 and "worst" not in text


def test_long_strip_wraps_label_and_value_lines_together():
    n = 37
    values = np.ones(n)
    values[23] = 0.5
    labels = [f"t{i}" for i in range(n)]
    lines = strip_text(values, cosine=True, threshold=0.999, token_labels=labels).plain.split("\n")
    assert len(lines) == 2 * 4 + 1  # 10 + 10 + 10 + 7 cells, then the worst list
    assert lines[4].split() == [f"t{i}" for i in range(20, 30)]  # labels of the third chunk
    assert all(len(line) == 70 for line in lines[:6])
    assert lines[-1].startswith("worst: 23 't23' ")


def test_3194_tokens_are_binned_to_a_bounded_strip():
    n = 3194
    values = np.full(n, 0.99999)
    values[1234] = 0.25  # one bad position
    values[77] = np.nan
    labels = [f"w{i}" for i in range(n)]
    lines = strip_text(values, cosine=True, threshold=0.999, token_labels=labels).plain.split("\n")
    assert len(lines) <= 2 * 10 + 1 and max(len(line) for line in lines[:-1]) <= 70
    width = -(-n // 100)  # 32 positions per bin
    first_labels = lines[0].split()
    assert first_labels[:3] == ["0+", f"{width}+", f"{2 * width}+"]
    cells = " ".join(lines[1::2][:10]).split()
    bad_bin = 1234 // width
    nan_bin = 77 // width
    assert cells[nan_bin] == "NaN"
    assert cells[bad_bin] != cells[bad_bin + 1]  # the bin holding 1234 shows its worst value
    assert lines[-1].startswith(f"worst (of {n} positions, binned): 77 'w77' NaN, 1234 'w1234' ")
