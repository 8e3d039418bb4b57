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
from tests.forward.hf_oracle import (
    TINY_WINDOW,
    build_hf_model,
    engine_model,
    hf_stage_captures,
)

TOKENS = [5, 17, 99, 3, 42, 7, 127]
"""Seven tokens, including the last vocabulary row; longer than the windowed models' window."""

MODELS = {
    "llama-untied": dict(arch="llama", tied=False),
    "llama-tied": dict(arch="llama", tied=True),
    "mistral": dict(arch="mistral", tied=False),
    "mistral-window": dict(arch="mistral", tied=False, sliding_window=TINY_WINDOW),
    "qwen2-bias-gqa": dict(arch="qwen2", tied=False),
    "qwen3-qk-norm": dict(arch="qwen3", tied=True),
    "qwen3moe-renormalized": dict(arch="qwen3_moe", tied=False, norm_topk_prob=True),
    "qwen2moe-shared-expert": dict(arch="qwen2_moe", tied=False),
    "qwen3moe-raw-topk-dense-layer": dict(
        arch="qwen3_moe", tied=True, norm_topk_prob=False, mlp_only_layers=[1]
    ),
    "gemma2-softcap-window": dict(arch="gemma2", tied=True),
    "gemma3-local-global": dict(arch="gemma3", tied=True),
}

PER_LAYER_STAGES = {"qwen2": 17, "gemma2": 18, "gemma3": 18}
"""Per-layer stages HF records: 16 for Llama's layer, + qkv_bias (Qwen2), + post_attn_norm and
post_ffn_norm (Gemma, whose ffn_gelu takes ffn_silu's place). An MoE layer has 15: the dense
FFN's gate/up/silu/swigl give way to moe_router, moe_router_indices and moe_ffn_out."""


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
    spec = dict(MODELS[request.param])
    hf_model = build_hf_model(spec.pop("arch"), seed=len(request.param), **spec)
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
    per_layer = [PER_LAYER_STAGES.get(name.split("-")[0], 16)] * config.num_hidden_layers
    if name.startswith(("qwen3moe", "qwen2moe")):
        bias = 1 if name.startswith("qwen2moe") else 0  # qkv_bias
        per_layer = [
            bias + (16 if i in config.mlp_only_layers else 15) for i in range(len(per_layer))
        ]
    assert len(expected) == 1 + sum(per_layer) + 2
    assert set(got) == set(expected)
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
    if model.config.is_moe_layer(1):  # the experts' inner stages are not layer-wide
        for inner in ("ffn_gate", "ffn_swigl"):
            expected.pop(inner)
        k = model.config.num_experts_per_tok
        expected.update(moe_router=(k,), moe_router_indices=(k,), moe_ffn_out=(hidden,))
    for stage_name, shape in expected.items():
        assert shapes[(1, stage_name)] == shape, stage_name
    assert shapes[(0, "embedding")] == (seq, hidden)
    assert shapes[(WHOLE_MODEL_LAYER, "final_norm")] == (seq, hidden)
    assert shapes[(WHOLE_MODEL_LAYER, "lm_head")] == (config.vocab_size,)
    assert order[0] == (0, "embedding")
    assert order[-2:] == [(WHOLE_MODEL_LAYER, "final_norm"), (WHOLE_MODEL_LAYER, "lm_head")]
    assert ((1, "qkv_bias") in shapes) == name.startswith("qwen2")


def test_scores_and_softmax_are_zero_at_every_blocked_key(oracle):
    """Above the diagonal, and for a sliding layer also `window` or more positions back."""
    _, hf_model, _ = oracle
    model = engine_model(hf_model)
    seq = len(TOKENS)
    for layer in range(model.config.num_layers):
        captures = {c.stage: c.array for c in trace(model, TOKENS, layers=(layer, layer + 1))}
        window = model.config.window(layer)
        i, j = np.indices((seq, seq))
        blocked = (j > i) | ((i - j >= window) if window is not None else False)
        for stage_name in ("attn_scores", "attn_softmax"):
            values = captures[stage_name]
            assert np.all(values[:, blocked] == 0.0)
            assert np.all(values[:, ~blocked] != 0.0)
        np.testing.assert_allclose(captures["attn_softmax"].sum(axis=-1), 1.0, rtol=1e-6)


def test_windowed_models_have_sliding_and_full_layers_as_hf_says(oracle):
    """The window is shorter than the prompt, so the sliding layers do cut keys off."""
    name, hf_model, _ = oracle
    config = engine_model(hf_model).config
    windows = [config.window(layer) for layer in range(config.num_layers)]
    if name == "gemma3-local-global":
        assert windows == [TINY_WINDOW, None, TINY_WINDOW] and len(TOKENS) > TINY_WINDOW
        assert [config.layer_rope_theta(layer) for layer in range(3)] == [1e4, 1e6, 1e4]
    elif name == "gemma2-softcap-window":
        assert windows == [TINY_WINDOW, None, TINY_WINDOW]
    elif name == "mistral-window":
        assert windows == [TINY_WINDOW] * 3
    else:
        assert windows == [None] * config.num_layers
