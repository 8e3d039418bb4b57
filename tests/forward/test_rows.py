"""Row reads: `WeightStore.get_rows` decodes only the rows asked for, bit for bit the rows of
`get`, and the forward pass uses it so the [vocab, hidden] tables are never dequantized whole.

Every file here is written by a real writer (our GGUF / APR / safetensors writers, the
safetensors package for bf16) and read back through `open_model`. References are plain numpy
over `get()`: the whole tensor sliced, the whole table indexed, the whole head multiplied.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from engine.demo import ScaledWeightStore
from engine.errors import MissingTensorError
from engine.formats import apr, gguf, open_model, safetensors
from engine.forward import LM_HEAD_BLOCK_ROWS, lm_head_row_blocks, lm_head_weight_name, trace
from engine.model import DictWeightStore, WeightStoreBase, weight_rows
from engine.stages import WHOLE_MODEL_LAYER
from engine.synth import synthesize

EMBED = "model.embed_tokens.weight"
MATRICES = (
    EMBED,
    "model.layers.0.mlp.gate_proj.weight",  # [intermediate, hidden]
    "model.layers.0.mlp.down_proj.weight",  # [hidden, intermediate]
    "model.layers.0.self_attn.q_proj.weight",  # GGUF stores it head-permuted: the fallback path
)


def _small(hidden: int, seed: int = 3):
    """A one-layer Llama whose rows are `hidden` (256: whole K-quant blocks; 300: padded)."""
    heads = 4 if hidden == 256 else 3  # head_dim 64 or 100
    return synthesize(
        "llama",
        seed=seed,
        hidden_size=hidden,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=1,
        intermediate_size=2 * hidden,
        vocab_size=300,
    )


def _row_ranges(rows: int) -> list[tuple[int, int]]:
    """First row, last row, one inner row, an inner band, everything, and an empty range."""
    return [(0, 1), (rows - 1, rows), (37, 38), (5, 71), (0, rows), (9, 9), (rows, rows)]


def _assert_rows_match_get(store, names) -> None:
    for name in names:
        whole = store.get(name)
        for start, stop in _row_ranges(whole.shape[0]):
            rows = store.get_rows(name, start, stop)
            assert rows.dtype == np.float32
            assert rows.shape == (stop - start, whole.shape[1])
            assert rows.flags.c_contiguous
            assert np.array_equal(rows, whole[start:stop]), (name, start, stop)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"])
def test_gguf_rows_equal_get(tmp_path, dtype):
    path = gguf.write(_small(256), tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    with open_model(path) as model:
        if dtype not in ("f32", "f16", "bf16"):  # the writer really quantized the table
            assert model.weights.qtype(EMBED).name == dtype.upper()
        _assert_rows_match_get(model.weights, MATRICES)


@pytest.mark.parametrize("hidden", [256, 300], ids=lambda h: f"cols{h}")
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_k", "q6_k", "q4", "q8"])
def test_apr_rows_equal_get(tmp_path, dtype, hidden):
    """cols 300: K-quants are stored per-row padded to 2 blocks a row; Q8_0 falls back to F32
    in the writer; APR Q4 blocks straddle rows, so get_rows falls back to slicing get()."""
    path = apr.write(_small(hidden), tmp_path / f"m-{dtype}.apr", dtype=dtype)
    with open_model(path) as model:
        _assert_rows_match_get(model.weights, MATRICES)


def test_safetensors_rows_equal_get_f32(tmp_path):
    directory = safetensors.write(_small(256), tmp_path / "ckpt")
    with open_model(directory) as model:
        _assert_rows_match_get(model.weights, MATRICES)


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_safetensors_rows_equal_get_half(tmp_path, torch_dtype):
    import torch  # the oracle: in the test extra, never skipped
    from safetensors.torch import save_file

    source = _small(256)
    directory = safetensors.write(source, tmp_path / "ckpt")
    tensors = {
        name: torch.from_numpy(source.weights.get(name)).to(getattr(torch, torch_dtype))
        for name in source.weights.names()
    }
    save_file(tensors, directory / "model.safetensors")
    with open_model(directory) as model:
        whole = model.weights.get(EMBED)
        assert not np.array_equal(whole, source.weights.get(EMBED))  # really narrowed
        _assert_rows_match_get(model.weights, MATRICES)


def test_dict_store_rows_are_copies():
    store = _small(256).weights
    _assert_rows_match_get(store, MATRICES)
    rows = store.get_rows(EMBED, 0, 2)
    rows[:] = 0.0
    assert np.any(store.get(EMBED)[:2] != 0.0)  # the store's array is untouched


def test_weight_rows_of_a_wrapping_store_are_its_scaled_rows():
    base = _small(256).weights
    store = ScaledWeightStore(base, EMBED, 2.0)
    np.testing.assert_array_equal(weight_rows(store, EMBED, 4, 9), base.get(EMBED)[4:9] * 2.0)


class _WholeOnlyStore(WeightStoreBase):
    """A store that can only decode whole tensors: it relies on the generic `get_rows`."""

    def __init__(self, arrays):
        self.source = "<whole-only>"
        self._entries = arrays

    def shape(self, name):
        return self._entry(name).shape

    def get(self, name):
        return np.array(self._entry(name), dtype=np.float32)


def test_the_generic_get_rows_slices_the_whole_tensor():
    store = _WholeOnlyStore({name: _small(256).weights.get(name) for name in MATRICES})
    _assert_rows_match_get(store, MATRICES)
    with pytest.raises(ValueError, match="outside"):
        store.get_rows(EMBED, 0, 301)
    with pytest.raises(MissingTensorError):
        store.get_rows("model.norm.weight", 0, 1)


@pytest.mark.parametrize("start, stop", [(-1, 2), (3, 2), (0, 301)])
def test_rows_outside_the_tensor_are_refused(tmp_path, start, stop):
    path = gguf.write(_small(256), tmp_path / "m.gguf", dtype="q8_0")
    with open_model(path) as model:
        with pytest.raises(ValueError, match="outside"):
            model.weights.get_rows(EMBED, start, stop)
        with pytest.raises(ValueError, match="2-D"):
            model.weights.get_rows("model.norm.weight", 0, 1)


# ---------------------------------------------------------------------------------------------
# The forward pass: embedding rows and the blocked lm_head


def test_lm_head_blocks_cover_the_vocab_without_a_tiny_tail():
    assert lm_head_row_blocks(300) == [(0, 300)]
    assert lm_head_row_blocks(32000) == [
        (start, min(start + LM_HEAD_BLOCK_ROWS, 32000)) for start in range(0, 32000, 4096)
    ]
    # A 1-row tail would be a dot product (different rounding): it joins the block before.
    assert lm_head_row_blocks(2 * LM_HEAD_BLOCK_ROWS + 1) == [(0, 4096), (4096, 8193)]
    assert lm_head_row_blocks(2 * LM_HEAD_BLOCK_ROWS + 64)[-1] == (8192, 8256)


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """Tied and untied 32000 x 256 Q8_0 GGUFs (the table: 31.25 MiB as float32)."""
    directory = tmp_path_factory.mktemp("big-vocab")
    paths = {}
    for tied in (True, False):
        model = synthesize(
            "llama",
            seed=7,
            hidden_size=256,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=512,
            vocab_size=32000,
            tied_embeddings=tied,
        )
        assert model.config.vocab_size == 32000
        paths[tied] = gguf.write(model, directory / f"tied-{tied}.gguf", dtype="q8_0")
    return paths


TOKENS = [31999, 5, 6, 7, 5, 0, 4100, 20000, 7]  # repeats, a run, both table ends


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embedding_and_lm_head_are_bit_identical_to_whole_table_numpy(big_vocab, tied):
    with open_model(big_vocab[tied]) as model:
        captures = {(c.layer, c.stage): c.array for c in trace(model, TOKENS)}
        table = model.weights.get(EMBED)  # [vocab, H], the reference's whole table
        assert np.array_equal(captures[(0, "embedding")], table[np.asarray(TOKENS)])
        head_name = lm_head_weight_name(model)
        assert head_name == (EMBED if tied else "lm_head.weight")
        head = model.weights.get(head_name)  # [vocab, H]
        last = captures[(WHOLE_MODEL_LAYER, "final_norm")][-1:]  # [1, H]
        expected = (last @ head.T)[0]  # the whole-head product, as before row blocks
        logits = captures[(WHOLE_MODEL_LAYER, "lm_head")]
        assert len(lm_head_row_blocks(logits.shape[0])) == 8
        assert np.array_equal(logits, expected)


def test_lm_head_with_a_one_row_tail_is_bit_identical():
    """vocab 4097: the 1-row tail joins the first block, so the head is one 4097-row product
    (a 1-row block would be numpy's dot product, whose rounding may differ)."""
    model = synthesize(
        "llama", seed=2, hidden_size=64, num_layers=1, intermediate_size=128, vocab_size=4097
    )
    assert model.config.vocab_size == 4097
    captures = {(c.layer, c.stage): c.array for c in trace(model, [1, 2, 3])}
    last = captures[(WHOLE_MODEL_LAYER, "final_norm")][-1:]
    head = model.weights.get(lm_head_weight_name(model))
    assert np.array_equal(captures[(WHOLE_MODEL_LAYER, "lm_head")], (last @ head.T)[0])


def test_dict_store_trace_matches_whole_table_lookup():
    model = _small(256)
    ids = [299, 3, 4, 3, 0]
    embedding = next(iter(trace(model, ids, stages=["embedding"]))).array
    assert np.array_equal(embedding, model.weights.get(EMBED)[np.asarray(ids)])


def _traced_peak(work) -> int:
    """Peak bytes of live Python/numpy allocations while `work()` ran (tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embedding_and_lm_head_peak_far_below_the_table(big_vocab, tied):
    """The trace's peak is about one 4096-row block (4 MiB), not the 31.25 MiB table."""
    table_bytes = 32000 * 256 * 4
    with open_model(big_vocab[tied]) as model:
        peak = _traced_peak(lambda: list(trace(model, TOKENS, stages=["embedding", "lm_head"])))
        whole_peak = _traced_peak(lambda: model.weights.get(EMBED))
    assert whole_peak >= table_bytes  # the measure sees a whole-table dequantization
    assert peak < table_bytes / 4, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("fmt", ["gguf", "apr", "safetensors"])
def test_one_row_costs_one_row(tmp_path, fmt):
    """get_rows decodes only its rows: one row of a 32000-row table is a few KiB, not 31 MiB."""
    model = synthesize(
        "llama", seed=1, hidden_size=256, num_layers=1, intermediate_size=256, vocab_size=32000
    )
    if fmt == "gguf":
        path = gguf.write(model, tmp_path / "m.gguf", dtype="q8_0")
    elif fmt == "apr":
        path = apr.write(model, tmp_path / "m.apr", dtype="q4_k")
    else:
        path = safetensors.write(model, tmp_path / "ckpt")
    with open_model(path) as opened:
        rows = {}
        peak = _traced_peak(
            lambda: rows.setdefault("r", opened.weights.get_rows(EMBED, 31998, 32000))
        )
        assert np.array_equal(rows["r"], opened.weights.get(EMBED)[31998:])
    assert peak < 64 * 1024, f"peak {peak} bytes for 2 rows"


def test_dict_store_is_a_weight_store_with_rows():
    store = DictWeightStore({"w": np.arange(12, dtype=np.float32).reshape(4, 3)})
    np.testing.assert_array_equal(store.get_rows("w", 1, 3), [[3, 4, 5], [6, 7, 8]])


def test_trace_over_a_wrapping_store_matches_its_whole_tables():
    """A store wrapping another (the demo's ScaledWeightStore) traces with the same bits as
    numpy over its whole tables."""
    base = _small(256)
    store = ScaledWeightStore(base.weights, EMBED, 2.0)
    model = dataclasses.replace(base, weights=store)
    ids = [299, 3, 4, 3, 0]
    captures = {(c.layer, c.stage): c.array for c in trace(model, ids)}
    table = store.get(EMBED)
    assert np.array_equal(captures[(0, "embedding")], table[np.asarray(ids)])
    head = store.get(lm_head_weight_name(model))
    last = captures[(WHOLE_MODEL_LAYER, "final_norm")][-1:]
    assert np.array_equal(captures[(WHOLE_MODEL_LAYER, "lm_head")], (last @ head.T)[0])
