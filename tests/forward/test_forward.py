"""The traced pass's contract beyond the numbers: filters, early stop, memory, cancel, errors."""

from __future__ import annotations

import dataclasses
import threading
import weakref

import numpy as np
import pytest

from engine.errors import FormatError, TokenizerError
from engine.forward import trace
from engine.model import DictWeightStore, Model
from engine.stages import PER_LAYER_STAGES, WHOLE_MODEL_LAYER
from tests.forward.agreement import TINY_MAX_REL_ERR, disagreements
from tests.forward.hf_oracle import build_hf_model, engine_model, hf_stage_captures

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def llama():
    return build_hf_model("llama", seed=11, tied=True)


class RecordingStore(DictWeightStore):
    """A DictWeightStore that remembers what it handed out, and keeps weak references to it."""

    def __init__(self, arrays):
        super().__init__(arrays)
        self.fetched: list[str] = []
        self.handed_out: list[tuple[str, weakref.ref]] = []

    def get(self, name):
        array = super().get(name)
        self.fetched.append(name)
        self.handed_out.append((name, weakref.ref(array)))
        return array

    def get_rows(self, name, start, stop):
        rows = super().get_rows(name, start, stop)
        self.fetched.append(name)
        self.handed_out.append((name, weakref.ref(rows)))
        return rows

    def alive(self) -> list[str]:
        return [name for name, ref in self.handed_out if ref() is not None]


def _recording_model(hf_model) -> tuple[Model, RecordingStore]:
    model = engine_model(hf_model)
    store = RecordingStore(model.weights.arrays)
    return dataclasses.replace(model, weights=store), store


def _ggml_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`: HF rotate-half rows -> GGML adjacent pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_adjacent_pairing_on_ggml_permuted_weights_matches_hf(llama):
    """`adjacent` RoPE over Q/K rows permuted as llama.cpp stores them is the same attention.

    Q and K come out in the permuted per-head order (pairs (2i, 2i+1) instead of (i, i+hd/2));
    un-permuting their columns must give HF's values, and every later stage must match as is.
    """
    model = engine_model(llama)
    config = model.config
    arrays = dict(model.weights.arrays)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}.self_attn."
        arrays[prefix + "q_proj.weight"] = _ggml_permute(
            arrays[prefix + "q_proj.weight"], config.num_heads
        )
        arrays[prefix + "k_proj.weight"] = _ggml_permute(
            arrays[prefix + "k_proj.weight"], config.num_kv_heads
        )
    permuted = dataclasses.replace(
        model,
        config=dataclasses.replace(config, rope_pairing="adjacent"),
        weights=DictWeightStore(arrays),
    )
    got = {(c.layer, c.stage): c.array for c in trace(permuted, TOKENS)}

    def unpermute(columns: np.ndarray, n_heads: int) -> np.ndarray:
        seq = columns.shape[0]
        per_head = columns.reshape(seq, n_heads, -1, 2)  # [seq, heads, hd/2, pair]
        return per_head.transpose(0, 1, 3, 2).reshape(seq, -1)

    q_dim, kv_dim = config.q_dim, config.kv_dim
    for layer in range(config.num_layers):
        got[(layer, "q_post_rope")] = unpermute(got[(layer, "q_post_rope")], config.num_heads)
        got[(layer, "k_post_rope")] = unpermute(got[(layer, "k_post_rope")], config.num_kv_heads)
        qkv = got[(layer, "qkv_matmul")]
        got[(layer, "qkv_matmul")] = np.concatenate(
            [
                unpermute(qkv[:, :q_dim], config.num_heads),
                unpermute(qkv[:, q_dim : q_dim + kv_dim], config.num_kv_heads),
                qkv[:, q_dim + kv_dim :],
            ],
            axis=1,
        )
    expected = hf_stage_captures(llama, TOKENS)
    assert disagreements(got, expected, max_rel=TINY_MAX_REL_ERR) == []


def test_stage_filter_yields_only_requested_stages_in_order(llama):
    captures = list(
        trace(engine_model(llama), TOKENS, stages=["lm_head", "attn_scores", "layer_output"])
    )
    keys = [(c.layer, c.stage) for c in captures]
    assert keys == [
        (0, "attn_scores"),
        (0, "post_ffn_residual"),
        (1, "attn_scores"),
        (1, "post_ffn_residual"),
        (2, "attn_scores"),
        (2, "post_ffn_residual"),
        (WHOLE_MODEL_LAYER, "lm_head"),
    ]


def test_filtered_captures_equal_the_unfiltered_ones(llama):
    model = engine_model(llama)
    everything = {(c.layer, c.stage): c.array for c in trace(model, TOKENS)}
    some = list(trace(model, TOKENS, stages=["ffn_swigl", "final_norm"], layers=(1, 2)))
    assert [(c.layer, c.stage) for c in some] == [
        (1, "ffn_swigl"),
        (WHOLE_MODEL_LAYER, "final_norm"),
    ]
    for capture in some:
        np.testing.assert_array_equal(capture.array, everything[(capture.layer, capture.stage)])


def test_layer_range_stops_early_without_whole_model_stages(llama):
    """Layers 0..1 without final_norm/lm_head: no weight of a later layer, no head, is read."""
    model, store = _recording_model(llama)
    per_layer = [s.name for s in PER_LAYER_STAGES]
    keys = [(c.layer, c.stage) for c in trace(model, TOKENS, stages=per_layer, layers=range(0, 1))]
    assert keys[0] == (0, "embedding")
    assert keys[-1] == (0, "post_ffn_residual")
    assert {layer for layer, _ in keys} == {0}
    assert not any(
        name.startswith(("model.layers.1.", "model.layers.2.")) for name in store.fetched
    )
    assert "model.norm.weight" not in store.fetched


def test_layer_range_with_whole_model_stages_runs_every_layer(llama):
    model, store = _recording_model(llama)
    keys = [
        (c.layer, c.stage)
        for c in trace(model, TOKENS, stages=["attn_norm", "lm_head"], layers=(1, 2))
    ]
    assert keys == [(1, "attn_norm"), (WHOLE_MODEL_LAYER, "lm_head")]
    assert "model.layers.2.mlp.down_proj.weight" in store.fetched
    # The embedding is not in 1..2 (apr saves it with layer 0), but the table was still read.
    assert store.fetched[0] == "model.embed_tokens.weight"


def test_weights_are_released_layer_by_layer(llama):
    """When a capture of layer L arrives, no weight of an earlier layer is alive, nor any rows
    of the embedding table, nor any weight of the next layer (what a decoding child holds ahead
    is its shared slots, engine.prefetch, not the pass's arrays); the tied head (the embedding
    table again) is read at the end."""
    model, store = _recording_model(llama)
    for capture in trace(model, TOKENS):
        alive = store.alive()
        if capture.layer == WHOLE_MODEL_LAYER:
            assert not any(name.startswith("model.layers.") for name in alive)
            continue
        assert "model.embed_tokens.weight" not in alive
        here = [n for n in alive if n.startswith(f"model.layers.{capture.layer}.")]
        ahead = [n for n in alive if n.startswith(f"model.layers.{capture.layer + 1}.")]
        assert sorted(here) == sorted(alive), alive  # nothing of any other layer
        assert ahead == [], alive
        # At most one matrix: the one in use.
        assert len([name for name in alive if name.endswith("proj.weight")]) <= 1
    # The lookup reads the table's rows first, the tied head reads them again, last.
    assert store.fetched[0] == "model.embed_tokens.weight"
    assert store.fetched[-1] == "model.embed_tokens.weight"
    assert store.fetched.count("model.embed_tokens.weight") >= 2
    assert store.alive() == []


def test_untied_head_reads_lm_head_weight():
    hf_model = build_hf_model("llama", seed=4, tied=False)
    model, store = _recording_model(hf_model)
    logits = [c for c in trace(model, TOKENS, stages=["lm_head"])][0].array
    assert store.fetched[-1] == "lm_head.weight"
    expected = hf_stage_captures(hf_model, TOKENS)[(WHOLE_MODEL_LAYER, "lm_head")]
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_captures_are_not_modified_after_they_are_handed_out(llama):
    model = engine_model(llama)
    captures = list(trace(model, TOKENS))
    snapshot = {(c.layer, c.stage): c.array.copy() for c in captures}
    again = {(c.layer, c.stage): c.array for c in trace(model, TOKENS)}
    for capture in captures:
        key = (capture.layer, capture.stage)
        np.testing.assert_array_equal(capture.array, snapshot[key])
        np.testing.assert_array_equal(again[key], snapshot[key])  # deterministic
        assert capture.array.dtype == np.float32


def test_cancel_between_stages_ends_the_pass(llama):
    cancel = threading.Event()
    model, store = _recording_model(llama)
    seen = []
    for capture in trace(model, TOKENS, cancel=cancel):
        seen.append(capture.stage)
        if capture.stage == "qkv_matmul":
            cancel.set()
    assert seen == ["embedding", "attn_norm", "qkv_matmul"]
    assert "model.layers.0.self_attn.o_proj.weight" not in store.fetched


def test_cancel_before_start_yields_nothing(llama):
    cancel = threading.Event()
    cancel.set()
    assert list(trace(engine_model(llama), TOKENS, cancel=cancel)) == []


@pytest.mark.parametrize(
    ("tokens", "message"),
    [([], "no tokens"), ([1, 128, 2], "token id 128 is outside the vocabulary (0..127)")],
)
def test_bad_token_ids_are_one_line_errors(llama, tokens, message):
    with pytest.raises(TokenizerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(trace(engine_model(llama), tokens))


def test_a_weight_whose_shape_contradicts_the_config_is_a_format_error(llama):
    model = engine_model(llama)
    arrays = dict(model.weights.arrays)
    arrays["model.layers.1.mlp.up_proj.weight"] = arrays["model.layers.1.mlp.up_proj.weight"][:-1]
    broken = dataclasses.replace(model, weights=DictWeightStore(arrays))
    with pytest.raises(
        FormatError, match=r"model.layers.1.mlp.up_proj.weight.*\[159, 64\].*\[160, 64\]"
    ):
        list(trace(broken, TOKENS))
