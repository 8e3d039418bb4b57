"""One seeded model in three containers: lossless storage gives identical tensors everywhere."""

from __future__ import annotations

import numpy as np

from engine.formats import apr, open_model


def test_lossless_storage_is_identical_across_formats(llama, llama_files):
    models = {kind: open_model(path) for kind, path in llama_files.items()}
    assert {m.format for m in models.values()} == {"safetensors", "gguf", "apr"}
    for kind, model in models.items():
        assert model.config == llama.config, kind
        assert model.weights.names() == llama.weights.names(), kind
    for name in llama.weights.names():
        reference = models["safetensors"].weights.get(name)
        np.testing.assert_array_equal(reference, llama.weights.get(name), err_msg=name)
        np.testing.assert_array_equal(models["gguf"].weights.get(name), reference, err_msg=name)
        np.testing.assert_array_equal(models["apr"].weights.get(name), reference, err_msg=name)


def test_tokenizers_agree_across_formats(llama_files):
    prompt = "<|im_start|>user\nWhat is 2+2? The answer is 4.<|im_end|>\n"
    ids = {kind: open_model(path).tokenizer.encode(prompt) for kind, path in llama_files.items()}
    assert ids["gguf"] == ids["safetensors"] == ids["apr"]
    assert ids["apr"][0] == 1 and ids["apr"][-2] == 2  # control tokens whole


def test_gguf_to_apr_conversion_keeps_hf_order(llama_files, llama, tmp_path):
    """GGUF Q/K rows are stored permuted; after conversion the APR holds HF order again."""
    converted = apr.write(open_model(llama_files["gguf"]), tmp_path / "from-gguf.apr")
    model = open_model(converted)
    assert model.config.rope_pairing == "half"
    np.testing.assert_array_equal(
        model.weights.get("model.layers.1.self_attn.q_proj.weight"),
        llama.weights.get("model.layers.1.self_attn.q_proj.weight"),
    )


def test_adjacent_pairing_apr_is_written_to_hf_order(tmp_path):
    """An APR with rope_type 0 holds llama.cpp-permuted Q/K rows; HF-order writers undo that."""
    from engine.formats import gguf, safetensors
    from engine.synth import synthesize

    from .apr_bytes import apr_file
    from .test_gguf import hf_row_of_gguf_row

    model = synthesize(
        "qwen3",
        seed=8,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )
    hd = model.config.head_dim  # 16
    stored = {}
    for name in model.weights.names():
        values = model.weights.get(name)
        if ".q_proj." in name:
            values = values[hf_row_of_gguf_row(2, hd)]
        elif ".k_proj." in name or name.endswith(("q_norm.weight", "k_norm.weight")):
            values = values[hf_row_of_gguf_row(1, hd)]
        stored[name] = values
    metadata = {
        "architecture": "qwen3",
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 64,
        "vocab_size": 277,
        "rope_type": 0,
        "tokenizer.vocabulary": model.tokenizer.tokens,
        "tokenizer.merges": model.tokenizer.merges,
    }
    path = tmp_path / "adjacent.apr"
    path.write_bytes(
        apr_file(metadata, [(n, 0, v.shape, v.astype("<f4").tobytes()) for n, v in stored.items()])
    )
    adjacent = open_model(path)
    assert adjacent.config.rope_pairing == "adjacent"
    np.testing.assert_array_equal(
        adjacent.weights.get("model.layers.0.self_attn.q_proj.weight"),
        stored["model.layers.0.self_attn.q_proj.weight"],
    )

    hf = open_model(safetensors.write(adjacent, tmp_path / "hf"))
    assert hf.config.rope_pairing == "half"
    for name in model.weights.names():
        np.testing.assert_array_equal(hf.weights.get(name), model.weights.get(name), err_msg=name)
    via_gguf = open_model(
        gguf.write(adjacent, tmp_path / "m.gguf")
    )  # qwen3: NEOX, stored unpermuted
    np.testing.assert_array_equal(
        via_gguf.weights.get("model.layers.0.self_attn.k_norm.weight"),
        model.weights.get("model.layers.0.self_attn.k_norm.weight"),
    )
