"""The speed-ups of issue 13 change no result: the GGUF vocabulary is decoded only when a token
is named or a prompt encoded (and then equals gguf-py's reading), and a linear's layout
changes no product. (Weights decoded ahead in a child: tests/forward/test_decoder_process.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from engine.formats import open_model
from engine.forward import trace


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
