"""The engine's forward pass against HF transformers, every stage of every layer.

Small seeded HF models (tests/forward/hf_oracle.py) of each supported architecture, each
handed to the engine four ways: in memory, and written to disk and opened again by the engine's
readers as an HF safetensors checkpoint (HF's own `save_pretrained`), a GGUF file and an APR
file (the engine's f32 writers). Bounds: tests/forward/agreement.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.forward import trace
from engine.model import Model
from engine.stages import WHOLE_MODEL_LAYER
from tests.forward.agreement import TINY_MAX_REL_ERR, disagreements
from tests.forward.hf_oracle import build_hf_model, engine_model, hf_stage_captures

TOKENS = [5, 17, 99, 3, 42, 7, 127]
"""Seven tokens, including the last vocabulary row."""

MODELS = {
    "llama-untied": dict(arch="llama", tied=False),
    "llama-tied": dict(arch="llama", tied=True),
    "mistral": dict(arch="mistral", tied=False),
    "qwen2-bias-gqa": dict(arch="qwen2", tied=False),
    "qwen3-qk-norm": dict(arch="qwen3", tied=True),
}


def _open_as(source: str, hf_model, tmp_path: Path) -> Model:
    """The HF model's weights as the engine sees them through `source`."""
    in_memory = engine_model(hf_model)
    if source == "memory":
        return in_memory
    from engine.formats import open_model

    if source == "safetensors":
        directory = tmp_path / "hf"
        hf_model.save_pretrained(directory)
        return open_model(directory)
    if source == "gguf":
        from engine.formats import gguf

        path = tmp_path / "model.gguf"
        gguf.write(in_memory, path, dtype="f32")
        return open_model(path)
    if source == "apr":
        from engine.formats import apr

        path = tmp_path / "model.apr"
        apr.write(in_memory, path, dtype="f32")
        return open_model(path)
    raise ValueError(source)


@pytest.fixture(scope="module", params=list(MODELS))
def oracle(request):
    """(name, HF model, HF's captures over TOKENS); one HF run per model for all sources."""
    spec = MODELS[request.param]
    hf_model = build_hf_model(spec["arch"], seed=len(request.param), tied=spec["tied"])
    return request.param, hf_model, hf_stage_captures(hf_model, TOKENS)


@pytest.mark.parametrize("source", ["memory", "safetensors", "gguf", "apr"])
def test_every_stage_of_every_layer_matches_hf(oracle, source, tmp_path):
    name, hf_model, expected = oracle
    model = _open_as(source, hf_model, tmp_path)
    try:
        got = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, TOKENS)}
    finally:
        model.close()

    config = hf_model.config
    per_layer = 17 if name.startswith("qwen2") else 16  # qkv_bias only with a QKV bias
    assert len(expected) == 1 + config.num_hidden_layers * per_layer + 2
    assert disagreements(got, expected, max_rel=TINY_MAX_REL_ERR) == []


def test_stage_shapes_and_layout_follow_apr(oracle):
    """§5 shapes: token-major rows, [heads, seq, seq] attention, last-token logits."""
    name, hf_model, _ = oracle
    model = engine_model(hf_model)
    config = model.config
    seq, hidden, inter = len(TOKENS), config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    expected = {
        "attn_norm": (seq, hidden),
        "qkv_matmul": (seq, q + 2 * kv),
        "q_post_rope": (seq, q),
        "k_post_rope": (seq, kv),
        "attn_scores": (config.num_heads, seq, seq),
        "attn_softmax": (config.num_heads, seq, seq),
        "attention": (seq, q),
        "attn_out": (seq, hidden),
        "ffn_gate": (seq, inter),
        "ffn_swigl": (seq, inter),
        "post_ffn_residual": (seq, hidden),
    }
    shapes = {}
    order = []
    for capture in trace(model, TOKENS):
        shapes[(capture.layer, capture.stage)] = capture.shape
        order.append((capture.layer, capture.stage))
        assert capture.array.shape == capture.shape
        assert capture.array.flags["C_CONTIGUOUS"]
    for stage_name, shape in expected.items():
        assert shapes[(1, stage_name)] == shape, stage_name
    assert shapes[(0, "embedding")] == (seq, hidden)
    assert shapes[(WHOLE_MODEL_LAYER, "final_norm")] == (seq, hidden)
    assert shapes[(WHOLE_MODEL_LAYER, "lm_head")] == (config.vocab_size,)
    assert order[0] == (0, "embedding")
    assert order[-2:] == [(WHOLE_MODEL_LAYER, "final_norm"), (WHOLE_MODEL_LAYER, "lm_head")]
    assert ((1, "qkv_bias") in shapes) == name.startswith("qwen2")


def test_scores_and_softmax_are_zero_above_the_diagonal(oracle):
    _, hf_model, _ = oracle
    captures = {c.stage: c.array for c in trace(engine_model(hf_model), TOKENS, layers=(0, 1))}
    future = np.triu(np.ones((len(TOKENS), len(TOKENS)), dtype=bool), k=1)
    for stage_name in ("attn_scores", "attn_softmax"):
        values = captures[stage_name]
        assert np.all(values[:, future] == 0.0)
        assert np.all(values[:, ~future] != 0.0)
    np.testing.assert_allclose(captures["attn_softmax"].sum(axis=-1), 1.0, rtol=1e-6)
