"""The real SmolLM2-135M-Instruct Q4_1 GGUF: our pass against HF transformers on the same file.

HF loads the GGUF itself (`from_pretrained(..., gguf_file=...)`: gguf-py dequantizes, HF
un-permutes Q/K), an independent path from our GGUF reader to the same float32 weights.
One HF forward and one trace of ours over a chat prompt, shared by the tests of this module.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.stages import WHOLE_MODEL_LAYER
from tests.forward.agreement import SMOLLM2_MAX_REL_ERR, cosine, disagreements, max_rel_err

pytestmark = pytest.mark.slow

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)
"""SmolLM2-Instruct's chat template applied to one user turn, as HF's `apply_chat_template`
renders it (with its default system prompt and the generation prompt). Spelled out here
because converting the GGUF tokenizer to an HF one costs 8 s of this module's time."""


@pytest.fixture(scope="module")
def smollm2_run(smollm2_gguf, smollm2_hf_model):
    from engine.formats import open_model
    from engine.forward import trace
    from tests.forward.hf_oracle import hf_stage_captures

    with open_model(smollm2_gguf) as model:
        token_ids = model.tokenizer.encode(CHAT_PROMPT)
    expected = hf_stage_captures(smollm2_hf_model, token_ids)

    with open_model(smollm2_gguf) as model:
        got = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, token_ids)}
        top_text = model.tokenizer.decode(
            [int(np.argmax(expected[(WHOLE_MODEL_LAYER, "lm_head")]))]
        )
        config = model.config
    return dict(token_ids=token_ids, expected=expected, got=got, config=config, top_text=top_text)


def test_top1_next_token_equals_hf(smollm2_run):
    hf_logits = smollm2_run["expected"][(WHOLE_MODEL_LAYER, "lm_head")]
    our_logits = smollm2_run["got"][(WHOLE_MODEL_LAYER, "lm_head")]
    assert our_logits.shape == (smollm2_run["config"].vocab_size,) == hf_logits.shape
    assert int(np.argmax(our_logits)) == int(np.argmax(hf_logits))
    # A real answer, not a degenerate one: the top token is ordinary text, not a control token.
    assert smollm2_run["top_text"].strip().isalnum()


def test_every_stage_of_every_layer_agrees_with_hf(smollm2_run):
    got, expected = smollm2_run["got"], smollm2_run["expected"]
    config = smollm2_run["config"]
    assert config.num_layers == 30
    assert len(smollm2_run["token_ids"]) == 37  # the chat markup around the question
    assert len(expected) == 1 + 30 * 16 + 2
    assert disagreements(got, expected, max_rel=SMOLLM2_MAX_REL_ERR) == []
    # The bounds are not loose: the logits agree far better than the bound requires.
    key = (WHOLE_MODEL_LAYER, "lm_head")
    assert cosine(got[key], expected[key]) > 0.999999
    assert max_rel_err(got[key], expected[key]) < SMOLLM2_MAX_REL_ERR / 5
