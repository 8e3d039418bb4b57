"""HF safetensors checkpoints: written by the safetensors package, read lazily by us."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from engine.errors import FormatError, MissingTensorError, UnsupportedModelError
from engine.formats import open_model, safetensors
from engine.synth import synthesize


def test_round_trip_is_exact_for_every_architecture(any_arch, tmp_path):
    directory = safetensors.write(any_arch, tmp_path / "ckpt")
    loaded = open_model(directory)
    assert loaded.format == "safetensors"
    assert loaded.config == any_arch.config
    assert loaded.weights.names() == [
        n
        for n in any_arch.weights.names()
        if not (any_arch.config.tied_embeddings and n == "lm_head.weight")
    ]
    for name in any_arch.weights.names():
        np.testing.assert_array_equal(
            loaded.weights.get(name), any_arch.weights.get(name), err_msg=name
        )


def test_the_single_file_opens_with_config_beside_it(llama_files, llama):
    model = open_model(llama_files["safetensors"] / "model.safetensors")
    assert model.config == llama.config
    np.testing.assert_array_equal(
        model.weights.get("lm_head.weight"), llama.weights.get("lm_head.weight")
    )


def test_files_are_read_by_the_safetensors_package_itself(llama_files, llama):
    from safetensors.numpy import load_file

    tensors = load_file(llama_files["safetensors"] / "model.safetensors")
    assert set(tensors) == set(llama.weights.names())
    np.testing.assert_array_equal(
        tensors["model.norm.weight"], llama.weights.get("model.norm.weight")
    )


def test_config_json_uses_hf_keys(llama_files):
    spec = json.loads((llama_files["safetensors"] / "config.json").read_text())
    assert spec["architectures"] == ["LlamaForCausalLM"]
    assert spec["model_type"] == "llama"
    assert (spec["hidden_size"], spec["num_hidden_layers"], spec["num_attention_heads"]) == (
        256,
        2,
        4,
    )
    assert (spec["num_key_value_heads"], spec["head_dim"], spec["intermediate_size"]) == (
        2,
        64,
        512,
    )
    assert spec["tie_word_embeddings"] is False
    assert spec["torch_dtype"] == "float32"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_transformers_loads_the_directory_with_identical_weights(arch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = synthesize(arch, seed=3, tied_embeddings=arch == "qwen2")
    directory = safetensors.write(model, tmp_path / arch)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert (
        type(hf).__name__
        == {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[arch]
    )
    state = hf.state_dict()
    for name in model.weights.names():
        np.testing.assert_array_equal(state[name].numpy(), model.weights.get(name), err_msg=name)
    if arch == "qwen2":  # tied: HF's lm_head is the embedding
        np.testing.assert_array_equal(
            state["lm_head.weight"].numpy(), model.weights.get("model.embed_tokens.weight")
        )
    text = "What is 2+2?<|im_start|>user\nhello there"
    hf_ids = AutoTokenizer.from_pretrained(directory)(text, add_special_tokens=False).input_ids
    assert model.tokenizer.encode(text) == hf_ids


def _raw_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file assembled by hand: u64 header length, JSON header, data."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_bf16_is_widened_exactly(llama, tmp_path):
    directory = safetensors.write(llama, tmp_path / "ckpt")
    # Replace the final norm by hand-made bf16 bits: 0x3F80 = 1.0, 0xC040 = -3.0, 0x3E20 = 0.15625.
    bits = np.array([0x3F80, 0xC040, 0x3E20, 0x7F80] * 64, dtype="<u2")
    names = {n: llama.weights.get(n) for n in llama.weights.names()}
    tensors = {n: ("F32", list(a.shape), a.astype("<f4").tobytes()) for n, a in names.items()}
    tensors["model.norm.weight"] = ("BF16", [256], bits.tobytes())
    _raw_safetensors(directory / "model.safetensors", tensors)
    values = open_model(directory).weights.get("model.norm.weight")
    assert values.dtype == np.float32
    np.testing.assert_array_equal(
        values[:4], np.array([1.0, -3.0, 0.15625, np.inf], dtype=np.float32)
    )


def test_f16_tensors_are_widened(llama, tmp_path):
    from safetensors.numpy import save_file

    directory = safetensors.write(llama, tmp_path / "ckpt")
    tensors = {n: llama.weights.get(n).astype(np.float16) for n in llama.weights.names()}
    save_file(tensors, directory / "model.safetensors")
    loaded = open_model(directory).weights.get("model.layers.1.mlp.up_proj.weight")
    np.testing.assert_array_equal(
        loaded, tensors["model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    )


def test_sharded_checkpoint_through_the_index(llama, tmp_path):
    from safetensors.numpy import save_file

    directory = safetensors.write(llama, tmp_path / "ckpt")
    (directory / "model.safetensors").unlink()
    names = llama.weights.names()
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, members in shards.items():
        save_file({n: llama.weights.get(n) for n in members}, directory / file)
        weight_map.update({n: file for n in members})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    loaded = open_model(directory)
    for name in names:
        np.testing.assert_array_equal(loaded.weights.get(name), llama.weights.get(name))


def test_nothing_is_loaded_until_asked_and_nothing_is_kept(llama_files):
    model = open_model(llama_files["safetensors"])
    store = model.weights
    assert store._maps == {}  # opening parsed only the header
    first = store.get("model.norm.weight")
    first[:] = 0  # the caller owns the array: the store hands out a fresh copy each time
    assert np.any(store.get("model.norm.weight") != 0)


# --- bad input ------------------------------------------------------------------------------


def test_missing_config_json(llama_files, tmp_path):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((llama_files["safetensors"] / "model.safetensors").read_bytes())
    with pytest.raises(FormatError, match=r"lone\.safetensors: missing config\.json"):
        open_model(lone)


def test_missing_tensor_is_named(llama, tmp_path):
    from safetensors.numpy import save_file

    directory = safetensors.write(llama, tmp_path / "ckpt")
    tensors = {
        n: llama.weights.get(n)
        for n in llama.weights.names()
        if n != "model.layers.1.mlp.down_proj.weight"
    }
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(
        MissingTensorError, match=r"ckpt: missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"
    ):
        open_model(directory)


def test_header_length_past_the_end(llama_files, tmp_path):
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text((llama_files["safetensors"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(
        FormatError,
        match=r"model\.safetensors: safetensors header length 1152921504606846976 exceeds the file \(10 bytes\)",
    ):
        open_model(bad)


def test_data_offsets_past_the_end(llama_files, tmp_path):
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text((llama_files["safetensors"] / "config.json").read_text())
    _raw_safetensors(bad / "model.safetensors", {"model.norm.weight": ("F32", [256], b"\0" * 16)})
    text = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(text.replace(b"[0, 16]", b"[0, 99]"))
    with pytest.raises(
        FormatError, match=r"tensor 'model\.norm\.weight' data \[0, 99\) lies past the end"
    ):
        open_model(bad)


def test_truncated_file(tmp_path, llama_files):
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text((llama_files["safetensors"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(FormatError, match=r"truncated safetensors file \(2 bytes"):
        open_model(bad)


@pytest.mark.parametrize(
    ("model_type", "extra", "message"),
    [
        ("mixtral", {"num_local_experts": 8}, r"unsupported architecture 'mixtral' with experts"),
        (
            "bert",
            {},
            r"unsupported architecture 'bert' \(mixture-of-experts and encoder models are not supported\)",
        ),
        (
            "gpt_neox",
            {},
            r"unsupported architecture 'gpt_neox'; supported: llama, mistral, qwen2, qwen3",
        ),
        (
            "llama",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"RoPE scaling 'llama3' is not supported",
        ),
    ],
)
def test_unsupported_configs(llama_files, tmp_path, model_type, extra, message):
    bad = tmp_path / "hf"
    bad.mkdir()
    spec = json.loads((llama_files["safetensors"] / "config.json").read_text())
    spec.update({"model_type": model_type, **extra})
    (bad / "config.json").write_text(json.dumps(spec))
    (bad / "model.safetensors").write_bytes(
        (llama_files["safetensors"] / "model.safetensors").read_bytes()
    )
    with pytest.raises(UnsupportedModelError, match=message):
        open_model(bad)


def test_tokenizer_json_pipeline_is_used_as_written(llama, tmp_path):
    """A Qwen2-style split (digits one by one) in tokenizer.json is honoured, and named `qwen2`."""
    from tokenizers import Regex, pre_tokenizers

    directory = safetensors.write(llama, tmp_path / "ckpt")
    spec = json.loads(llama.tokenizer.to_tokenizer_json())
    spec["model"]["vocab"]["12"] = 277  # a merged digit pair: the GPT-2 split would use it
    spec["model"]["merges"].append(
        ["1", "2"] if isinstance(spec["model"]["merges"][0], list) else "1 2"
    )
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    spec["pre_tokenizer"] = json.loads(pre.__getstate__())
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    loaded = open_model(directory)
    assert loaded.tokenizer.pre == "qwen2"
    assert loaded.tokenizer.encode("12") == [ord("1") + 3, ord("2") + 3]  # digits split first
    assert loaded.tokenizer.encode("W12") == [ord("W") + 3, ord("1") + 3, ord("2") + 3]


def test_quantized_hf_checkpoints_are_refused(llama_files, tmp_path):
    bad = tmp_path / "hf"
    bad.mkdir()
    spec = json.loads((llama_files["safetensors"] / "config.json").read_text())
    spec["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(spec))
    (bad / "model.safetensors").write_bytes(
        (llama_files["safetensors"] / "model.safetensors").read_bytes()
    )
    with pytest.raises(
        UnsupportedModelError,
        match=r"config\.json: quantized checkpoints \(gptq\) are not supported",
    ):
        open_model(bad)


@pytest.mark.parametrize(
    ("offsets", "reason"),
    [(b"[10, 5]", "its end comes before its start"), (b"[-4,16]", "a negative start")],
)
def test_data_offsets_out_of_order_say_so(llama_files, tmp_path, offsets, reason):
    """Was: `data_offsets [10, 5]` reported as lying "past the end of the file"."""
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text((llama_files["safetensors"] / "config.json").read_text())
    _raw_safetensors(bad / "model.safetensors", {"model.norm.weight": ("F32", [4], b"\0" * 16)})
    text = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(text.replace(b"[0, 16]", offsets))
    with pytest.raises(FormatError, match=r"tensor 'model\.norm\.weight' has data_offsets .*"):
        open_model(bad)
    with pytest.raises(FormatError, match=reason):
        open_model(bad)
