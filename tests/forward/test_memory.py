"""Memory stays flat: dequantizing a tensor costs one float32 copy of it, and a GGUF trace's
per-layer peak does not grow with depth.

Measured with tracemalloc, which numpy reports every array allocation to, so the numbers are
exact byte counts of live arrays (no timing, no RSS sampling). bench/memory_bench.py measures
the same on a 7B-shaped file through the real CLI.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from engine.formats import gguf as gguf_format
from engine.formats import open_model
from engine.formats.quant import dequantize_ggml, dequantize_k_rows_padded, quantize_ggml
from engine.forward import trace
from engine.synth import synthesize

MIB = 1 << 20


def _traced_peak(work) -> tuple[object, int]:
    """(result, peak bytes of live Python/numpy allocations while `work()` ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - base


@pytest.mark.parametrize(
    "qtype",
    [GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q5_0],
    ids=lambda qtype: qtype.name,
)
def test_gguf_py_dequantize_peaks_at_one_float32_copy(qtype):
    """Regression: gguf.quants.dequantize on a whole tensor holds every 16-block group's output
    and then concatenates them, so a Q4_K matrix peaked at twice its float32 size (a 7B FFN
    matrix: 2 x 172 MiB, the largest term of a 7B trace). Our path must stay near one copy."""
    rows, cols = 2048, 2048  # 16 MiB as float32: several chunks
    rng = np.random.default_rng(5)
    raw = quantize_ggml(rng.standard_normal((rows, cols), dtype=np.float32), qtype).reshape(-1)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    expected = gguf_quants.dequantize(raw.reshape(-1, block_bytes), qtype).reshape(-1)
    output_bytes = rows * cols * 4

    values, peak = _traced_peak(lambda: dequantize_ggml(raw, qtype, rows * cols))

    assert values.dtype == np.float32
    assert np.array_equal(values, expected)  # bit for bit against the whole-tensor decode
    assert peak < 1.5 * output_bytes, f"peak {peak / MIB:.1f} MiB for a 16 MiB tensor"


def test_padded_k_rows_dequantize_peaks_at_one_float32_copy():
    """APR's per-row padded K-quant rows (GH-202) go through the same chunked decode."""
    rows, cols = 2048, 2048  # rows already whole blocks: no padding columns to drop
    qtype = GGMLQuantizationType.Q4_K
    rng = np.random.default_rng(6)
    raw = quantize_ggml(rng.standard_normal((rows, cols), dtype=np.float32), qtype).reshape(-1)
    expected = gguf_quants.dequantize(raw.reshape(rows, -1), qtype)  # [rows, cols]

    values, peak = _traced_peak(lambda: dequantize_k_rows_padded(raw, qtype, rows, cols))

    assert np.array_equal(values, expected)
    assert peak < 1.5 * rows * cols * 4, f"peak {peak / MIB:.1f} MiB for a 16 MiB tensor"


def test_gguf_trace_peak_does_not_grow_with_depth(tmp_path):
    """Each layer of a Q4_K GGUF trace peaks at the same traced memory: the store keeps no
    dequantized weight and the pass keeps nothing of a finished layer but its output."""
    num_layers = 6
    model = synthesize(
        "llama",
        seed=3,
        hidden_size=256,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=768,
        vocab_size=512,
    )
    path = gguf_format.write(model, tmp_path / "deep.gguf", dtype="q4_k")
    # One layer's weights as float32: q, o [H, H]; k, v [H/2, H]; gate, up, down [I, H]; norms.
    layer_weight_bytes = (2 * 256 * 256 + 2 * 128 * 256 + 3 * 768 * 256 + 2 * 256) * 4

    layer_peaks: list[int] = []

    def on_layer(done: int, total: int) -> None:
        layer_peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.reset_peak()

    def run() -> int:
        with open_model(path) as opened:
            return sum(1 for _ in trace(opened, [1, 2, 3, 4, 5], on_layer=on_layer))

    captures, _ = _traced_peak(run)

    assert captures > 0
    assert len(layer_peaks) == num_layers
    # Layer 0's window also holds the embedding lookup; compare the others with layer 1.
    reference = layer_peaks[1]
    growth = [peak - reference for peak in layer_peaks[2:]]
    assert max(growth) < layer_weight_bytes / 4, (
        f"per-layer peaks {[p // 1024 for p in layer_peaks]} KiB grow with depth "
        f"(one layer's weights are {layer_weight_bytes // 1024} KiB)"
    )
