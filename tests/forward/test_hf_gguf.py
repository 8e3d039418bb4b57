"""The oracle's GGUF copy without the vocabulary (tests.forward.hf_gguf), read back by gguf-py.

gguf-py writes a small file with a vocabulary, other keys of every kind, a custom alignment and
tensors; the copy, read by gguf-py's own reader, must hold every other key with its value, no
vocabulary key, and every tensor with the same type, shape and bytes.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tests.forward.hf_gguf import VOCABULARY_ARRAYS, write_without_vocabulary


def _fields(reader) -> dict[str, object]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader) -> dict[str, tuple]:
    return {
        t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), bytes(np.asarray(t.data)))
        for t in reader.tensors
    }


@pytest.mark.parametrize("alignment", [32, 64])
def test_copy_keeps_every_key_and_tensor_but_the_vocabulary(tmp_path, alignment):
    source, copy = tmp_path / "model.gguf", tmp_path / "copy.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    if alignment != 32:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_rope_freq_base(10000.0)
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "a", "bé", "Ġc"])
    writer.add_token_scores([0.0, -1.0, -2.5, -3.0])
    writer.add_token_types([3, 1, 1, 1])
    writer.add_token_merges(["a b", "Ġ c"])
    writer.add_bos_token_id(0)
    writer.add_array("general.tags", ["x", "yz"])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 8)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float16))
    writer.add_tensor("output_norm.weight", np.arange(3, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert write_without_vocabulary(source, copy) == 4

    original, stripped = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(copy))
    expected = {k: v for k, v in _fields(original).items() if k not in VOCABULARY_ARRAYS}
    assert "tokenizer.ggml.tokens" in _fields(original)  # the file really had a vocabulary
    got = _fields(stripped)
    kv_count = "GGUF.kv_count"  # gguf-py's pseudo-field: one less per key left out
    assert got.pop(kv_count) == expected.pop(kv_count) - len(VOCABULARY_ARRAYS)
    assert got == expected
    assert _tensors(stripped) == _tensors(original)
    assert copy.stat().st_size < source.stat().st_size
