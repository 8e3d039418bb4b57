"""Synthesized models: seeded, complete for their architecture, activations of order one."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import UnsupportedModelError
from engine.formats.common import expected_tensors
from engine.synth import synthesize


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tensors_match_the_architecture(arch):
    model = synthesize(arch, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32)
    config = model.config
    assert config.head_dim == 32 and config.q_dim == 128 and config.kv_dim == 64
    assert config.qkv_bias == (arch == "qwen2") and config.qk_norm == (arch == "qwen3")
    shapes = {name: model.weights.shape(name) for name in model.weights.names()}
    assert shapes == expected_tensors(config)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (128, 64)
    assert ("model.layers.0.self_attn.q_proj.bias" in shapes) == (arch == "qwen2")
    assert ("model.layers.0.self_attn.k_norm.weight" in shapes) == (arch == "qwen3")


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = synthesize("qwen2", seed=5), synthesize("qwen2", seed=5), synthesize("qwen2", seed=6)
    name = "model.layers.0.self_attn.v_proj.weight"
    np.testing.assert_array_equal(a.weights.get(name), b.weights.get(name))
    assert not np.array_equal(a.weights.get(name), c.weights.get(name))


def test_scales_keep_activations_of_order_one():
    model = synthesize("llama", hidden_size=256, intermediate_size=512)
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)  # [seq, hidden]
    y = x @ model.weights.get("model.layers.0.mlp.up_proj.weight").T  # [seq, inter]
    assert 0.7 < float(y.std()) < 1.3
    norm = model.weights.get("model.layers.0.input_layernorm.weight")
    assert 0.8 < float(norm.mean()) < 1.2 and float(norm.std()) > 0.01


def test_tied_embeddings_drop_lm_head_and_vocab_follows_the_tokenizer():
    model = synthesize("qwen3", tied_embeddings=True, vocab_size=320)
    assert not model.weights.has("lm_head.weight")
    assert model.config.vocab_size == 320 == model.tokenizer.vocab_size
    assert model.weights.shape("model.embed_tokens.weight") == (320, 64)


def test_unsupported_architecture():
    with pytest.raises(UnsupportedModelError, match=r"synthesize: unsupported architecture 'gpt2'"):
        synthesize("gpt2")
