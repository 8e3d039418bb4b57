"""bench/trace_bench.py's physical limit: the serial start read from a trace's progress lines,
and the bound it gives (the numbers below are worked by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "trace_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("trace_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serial_start_is_the_first_layer_line_less_one_mean_layer(bench):
    # Layers 1..30 end at 0.40, 0.42, ..., 0.98 s: 0.02 s a layer, so layer 1 began at 0.38 s.
    lines = [(0.01, "checking model.apr: 1 GiB in 0.2 s")]
    lines += [(0.40 + 0.02 * (n - 1), f"tracing m.gguf: layer {n}/30") for n in range(1, 31)]
    assert bench.serial_start(lines) == pytest.approx(0.38)


def test_serial_start_needs_two_layer_lines(bench):
    assert bench.serial_start([(0.5, "tracing m.gguf: layer 1/1")]) is None
    assert bench.serial_start([(0.5, "something else")]) is None


def test_physical_limit_spreads_the_rest_over_the_cores(bench):
    # 0.3 s serial, 1.5 s of CPU in all: 1.2 s left, 0.6 s on two cores.
    assert bench.physical_limit(0.3, 1.5, 2) == pytest.approx(0.9)
    assert bench.physical_limit(0.3, 1.5, 1) == pytest.approx(1.5)
    # A run whose CPU time is all start (a failure before the first layer): the start alone.
    assert bench.physical_limit(0.3, 0.2, 2) == pytest.approx(0.3)
