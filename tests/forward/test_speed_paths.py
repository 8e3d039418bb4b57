"""The speed-ups of issue 13 change no result: the GGUF vocabulary is decoded only when a token
is named or a prompt encoded (and then equals gguf-py's reading), and the weight prefetcher
hands out exactly the store's arrays, each decoded once per pass."""

from __future__ import annotations

import numpy as np
import pytest

from engine.formats import open_model
from engine.forward import trace
from engine.prefetch import WeightPrefetcher


@pytest.mark.slow
def test_tokens_trace_never_decodes_the_vocabulary(smollm2_gguf):
    from gguf import GGUFReader

    with open_model(smollm2_gguf) as model:
        tokens = model.tokenizer.tokens
        for _ in trace(model, [1, 2, 3], stages=["attn_norm"], layers=(0, 1)):
            pass
        assert tokens._items is None and len(tokens) == 49152  # still undecoded
        # named on demand: the same strings gguf-py reads
        reader = GGUFReader(smollm2_gguf)
        field = reader.fields["tokenizer.ggml.tokens"]
        expected = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        assert [model.tokenizer.token_text(i) for i in (0, 1, 100, 49151)] == [
            expected[i] for i in (0, 1, 100, 49151)
        ]
        assert list(tokens) == expected
        merges = reader.fields["tokenizer.ggml.merges"]
        assert list(model.tokenizer.merges) == [
            bytes(merges.parts[i]).decode("utf-8") for i in merges.data
        ]


class CountingStore:
    def __init__(self, arrays):
        self.arrays = arrays
        self.calls: list[str] = []

    def has(self, name):
        return name in self.arrays

    def get(self, name):
        self.calls.append(name)
        return self.arrays[name].copy()


def test_prefetcher_returns_the_store_arrays_each_decoded_once(monkeypatch):
    import engine.prefetch

    monkeypatch.setattr(engine.prefetch, "PREFETCH_WEIGHTS", True)
    keys = ["input_layernorm.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight"]
    rng = np.random.default_rng(0)
    arrays = {
        f"model.layers.{layer}.{key}": rng.standard_normal(4) for layer in range(3) for key in keys
    }
    arrays["model.norm.weight"] = rng.standard_normal(4)
    store = CountingStore(arrays)
    prefetch = WeightPrefetcher(store, num_layers=3)
    order = [f"model.layers.{layer}.{key}" for layer in range(3) for key in keys]
    order.append("model.norm.weight")
    for name in order:
        assert np.array_equal(prefetch.get(name), arrays[name])
    prefetch.close()
    assert sorted(store.calls) == sorted(order)  # every weight read once, none twice
    # a wrong guess is dropped: the asked-for name is still the one returned
    store.calls.clear()
    prefetch = WeightPrefetcher(store, num_layers=3)
    for name in order[:4]:  # learn layer 0, then prefetch layer 1's second weight
        prefetch.get(name)
    assert np.array_equal(prefetch.get("model.norm.weight"), arrays["model.norm.weight"])
    prefetch.close()
    assert store.calls.count("model.layers.1.self_attn.q_proj.weight") == 1


@pytest.mark.parametrize("seq", [37, 300])
def test_linear_is_row_major_for_long_prompts_with_the_same_products(seq):
    """Past DIRECT_LINEAR_TOKENS a linear's output is row-major (a captured stage is not
    copied again); at any length the products are nn.Linear's, checked against float64."""
    from engine.forward import DIRECT_LINEAR_TOKENS, linear

    rng = np.random.default_rng(seq)
    x = rng.standard_normal((seq, 96)).astype(np.float32)  # [seq, in]
    weight = rng.standard_normal((160, 96)).astype(np.float32)  # [out, in]
    bias = rng.standard_normal(160).astype(np.float32)
    out = linear(x, weight, bias)
    assert out.shape == (seq, 160) and out.dtype == np.float32
    assert out.flags.c_contiguous == (seq >= DIRECT_LINEAR_TOKENS)
    exact = x.astype(np.float64) @ weight.astype(np.float64).T + bias  # [seq, out]
    # float32 dot products of 96 terms: within 96 units of rounding of their magnitude
    scale = np.abs(x).astype(np.float64) @ np.abs(weight).astype(np.float64).T + np.abs(bias)
    assert np.all(np.abs(out - exact) <= 96 * 2.0**-24 * scale)
