"""`apr-tui diff --limit N` for a long list (every logit): the rows follow the report's panel
as plain lines, all of them, in the order of |a - b|."""

from __future__ import annotations

import numpy as np

from engine.aprt import write_aprt
from tests.commands.conftest import run_cli

COUNT, LIMIT = 4096, 500


def test_a_long_top_list_prints_every_row_in_order(apr_tui, tmp_path):
    rng = np.random.default_rng(11)
    a = rng.standard_normal(COUNT).astype(np.float32)
    b = (a + rng.standard_normal(COUNT).astype(np.float32) * np.float32(0.01)).astype(np.float32)
    write_aprt(tmp_path / "a.bin", 3, a)
    write_aprt(tmp_path / "b.bin", 3, b)
    result = run_cli([*apr_tui, "diff", str(tmp_path / "a.bin"), str(tmp_path / "b.bin"),
                      "--limit", str(LIMIT)])  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"Top divergences (by |a - b|): {LIMIT}, listed below the panel" in result.stdout
    title = lines.index("Top divergences (by |a - b|)")  # the list's own title, after the panel
    assert lines[title + 1].split() == ["index", "a", "b", "|Δ|"]
    rows = [line.split() for line in lines[title + 2 :]]
    assert len(rows) == LIMIT
    delta = np.abs(a.astype(np.float64) - b.astype(np.float64)).astype(np.float32)
    expected = np.argsort(-delta, kind="stable")[:LIMIT]  # ties in index order
    assert [int(row[0]) for row in rows] == expected.tolist()
    # apr's format: seven significant digits (`{:.6e}` in Rust)
    np.testing.assert_allclose([float(row[1]) for row in rows], a[expected], rtol=6e-7)
    np.testing.assert_allclose([float(row[2]) for row in rows], b[expected], rtol=6e-7)
    np.testing.assert_allclose([float(row[3]) for row in rows], delta[expected], rtol=6e-7)
