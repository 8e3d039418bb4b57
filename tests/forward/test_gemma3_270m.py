"""The real Gemma 3 270M Q4_K_M GGUF: our pass against HF transformers on the same file.

HF loads the GGUF itself (`from_pretrained(..., gguf_file=...)`: gguf-py dequantizes the
Q4_K / Q5_0 / Q6_K / Q8_0 tensors and its Gemma processor subtracts llama.cpp's +1 from the norm
weights), an independent path from our GGUF reader to the same float32 weights. Every stage of
every layer is compared on two prompts: a short question, and one longer than the model's
512-token sliding window, so the five-of-six sliding layers drop keys the global ones keep.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.stages import WHOLE_MODEL_LAYER
from tests.forward.agreement import (
    GEMMA3_LONG_MAX_REL_ERR,
    GEMMA3_MAX_REL_ERR,
    cosine,
    disagreements,
    max_rel_err,
)

pytestmark = pytest.mark.slow

QUESTION = (
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
)
"""Gemma's chat markup around one user turn, spelled out (its control tokens are single ids)."""

LONG_TEXT = " ".join(f"Item {n} of the list is the number {n * 7 % 101}." for n in range(1, 70))
"""About 800 tokens of plain text: longer than the 512-token window."""


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_gguf, tmp_path_factory):
    """HF transformers' own load of the GGUF, float32, eager attention (about 6 s, through a copy
    without the vocabulary: tests.forward.hf_gguf; 67 s with it)."""
    from tests.forward.hf_gguf import hf_model_from_gguf

    return hf_model_from_gguf(gemma3_gguf, tmp_path_factory.mktemp("hf-gemma3"))


def _run(gguf_path, hf_model, text):
    from engine.formats import open_model
    from engine.forward import trace
    from tests.forward.hf_oracle import hf_stage_captures

    with open_model(gguf_path) as model:
        token_ids = [model.config.bos_token_id, *model.tokenizer.encode(text)]
        got = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, token_ids)}
        config, tokenizer = model.config, model.tokenizer
    expected = hf_stage_captures(hf_model, token_ids)
    return dict(token_ids=token_ids, got=got, expected=expected, config=config, tok=tokenizer)


@pytest.fixture(scope="module")
def question_run(gemma3_gguf, gemma3_hf):
    return _run(gemma3_gguf, gemma3_hf, QUESTION)


def test_the_file_is_the_gemma3_the_issue_describes(question_run):
    config = question_run["config"]
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        18,
        4,
        1,
        256,
    )
    windows = [config.window(layer) for layer in range(18)]
    assert windows == [None if (layer + 1) % 6 == 0 else 512 for layer in range(18)]
    assert config.layer_rope_theta(0) == 10000.0 and config.layer_rope_theta(5) == 1000000.0


def test_top1_next_token_equals_hf(question_run):
    hf_logits = question_run["expected"][(WHOLE_MODEL_LAYER, "lm_head")]
    our_logits = question_run["got"][(WHOLE_MODEL_LAYER, "lm_head")]
    assert our_logits.shape == (262144,) == hf_logits.shape
    top = int(np.argmax(hf_logits))
    assert int(np.argmax(our_logits)) == top
    # A real word, not a degenerate pick (a control token, whitespace or a byte piece).
    assert question_run["tok"].decode([top]).strip().isalpha()


def test_every_stage_of_every_layer_agrees_with_hf(question_run):
    got, expected = question_run["got"], question_run["expected"]
    assert len(expected) == 1 + 18 * 18 + 2
    assert disagreements(got, expected, max_rel=GEMMA3_MAX_REL_ERR) == []
    key = (WHOLE_MODEL_LAYER, "lm_head")
    assert cosine(got[key], expected[key]) > 0.999999
    assert max_rel_err(got[key], expected[key]) < GEMMA3_MAX_REL_ERR / 10


def test_a_prompt_longer_than_the_window_agrees_with_hf(gemma3_gguf, gemma3_hf):
    run = _run(gemma3_gguf, gemma3_hf, LONG_TEXT)
    assert len(run["token_ids"]) > 512 + 64
    got, expected = run["got"], run["expected"]
    assert disagreements(got, expected, max_rel=GEMMA3_LONG_MAX_REL_ERR) == []
    # The window cuts: the last query of a sliding layer gives the first keys exactly nothing.
    assert np.all(got[(0, "attn_softmax")][:, -1, : len(run["token_ids"]) - 512] == 0.0)
    assert np.all(got[(5, "attn_softmax")][:, -1, :] > 0.0)
    hf_top = int(np.argmax(expected[(WHOLE_MODEL_LAYER, "lm_head")]))
    assert int(np.argmax(got[(WHOLE_MODEL_LAYER, "lm_head")])) == hf_top


def test_demo_pair_opens_and_bisect_finds_the_planted_scale(gemma3_gguf, apr_tui, tmp_path):
    """`apr-tui demo --model gemma3`'s pair (engine.demo.build_gemma3_demo): the real GGUF and a
    Q8_0 .apr copy with layer 2's up_proj ×18, through the real `apr-tui bisect`. Gemma's
    post-FFN norm divides the scale out again, so only the std ratio sees it, at L2 ffn_up."""
    import subprocess

    from engine.demo import build_gemma3_demo

    pair = build_gemma3_demo(tmp_path, gemma3_gguf)
    assert pair.model_a == gemma3_gguf and pair.model_b.suffix == ".apr"
    result = subprocess.run(
        [*apr_tui, "bisect", str(pair.model_a), str(pair.model_b)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    assert "(gguf, gemma3, 18 layers" in result.stdout
    assert "(apr, gemma3, 18 layers" in result.stdout
    assert "p_attn" in result.stdout and "gelu" in result.stdout and "p_ffn" in result.stdout
    assert "First scale divergence (std ratio outside [0.5, 2.0]): layer 2 ffn_up" in result.stdout
