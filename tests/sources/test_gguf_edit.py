"""The test-support helper that plants scaled block scales in a copy of a GGUF."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gguf import GGUFReader

from engine.formats.gguf import read_header
from tests.forward.hf_gguf import write_without_vocabulary
from tests.support.gguf_edit import scale_block_scales


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensor(path, name, scratch):
    """(raw bytes [blocks, block_bytes], dequantized [rows, cols]) of one tensor, via gguf-py
    (reading a copy without the vocabulary, whose parse is most of gguf-py's time:
    tests.forward.hf_gguf; the tensors are copied byte for byte)."""
    from gguf import dequantize

    copy = scratch / f"{path.stem}-no-vocabulary.gguf"
    write_without_vocabulary(path, copy)
    reader = GGUFReader(copy)
    found = next(t for t in reader.tensors if t.name == name)
    raw = np.array(found.data, dtype=np.uint8)
    return raw, dequantize(found.data, found.tensor_type)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blk.3.ffn_down.weight", "token_embd.weight"])
def test_scales_exactly_the_chosen_blocks_and_leaves_the_original(smollm2_gguf, tmp_path, name):
    before = _sha(smollm2_gguf)
    planted = scale_block_scales(
        smollm2_gguf, tmp_path / "bug.gguf", name, fraction=0.01, factor=1.5, seed=7
    )
    assert _sha(smollm2_gguf) == before
    raw_a, values_a = _tensor(smollm2_gguf, name, tmp_path)
    raw_b, values_b = _tensor(planted.path, name, tmp_path)
    block_bytes = {"Q4_1": 20, "Q8_0": 34}[planted.qtype]
    blocks_a = raw_a.reshape(-1, block_bytes)
    blocks_b = raw_b.reshape(-1, block_bytes)
    assert len(blocks_a) == planted.total_blocks
    assert len(planted.blocks) == round(0.01 * planted.total_blocks)
    changed = np.flatnonzero((blocks_a != blocks_b).any(axis=1))
    chosen_nonzero = [b for b in planted.blocks if blocks_a[b, :2].view("<f2")[0] != 0]
    np.testing.assert_array_equal(changed, chosen_nonzero)
    # Only the two d bytes moved, and d became f16(d * 1.5).
    np.testing.assert_array_equal(blocks_a[:, 2:], blocks_b[:, 2:])
    d_a = blocks_a[planted.blocks, :2].copy().view("<f2")[:, 0]
    d_b = blocks_b[planted.blocks, :2].copy().view("<f2")[:, 0]
    np.testing.assert_array_equal(d_b, (d_a.astype(np.float32) * 1.5).astype(np.float16))
    # Dequantized: every other block is bit-identical; the chosen ones moved by d's change.
    flat_a, flat_b = values_a.reshape(-1, 32), values_b.reshape(-1, 32)
    others = np.setdiff1d(np.arange(len(flat_a)), planted.blocks)
    np.testing.assert_array_equal(flat_a[others], flat_b[others])
    # Every other byte of the file is unchanged.
    start = read_header(smollm2_gguf).tensors[name].start
    whole_a = np.fromfile(smollm2_gguf, dtype=np.uint8)
    whole_b = np.fromfile(planted.path, dtype=np.uint8)
    assert whole_a.size == whole_b.size
    allowed = {start + int(b) * block_bytes + i for b in planted.blocks for i in (0, 1)}
    assert set(np.flatnonzero(whole_a != whole_b).tolist()) <= allowed


def test_refuses_unknown_tensors_plain_types_and_existing_outputs(smollm2_gguf, tmp_path):
    with pytest.raises(ValueError, match="no tensor"):
        scale_block_scales(smollm2_gguf, tmp_path / "a.gguf", "nope", fraction=0.1, factor=2)
    with pytest.raises(ValueError, match="F32"):
        scale_block_scales(
            smollm2_gguf, tmp_path / "b.gguf", "blk.0.attn_norm.weight", fraction=0.1, factor=2
        )
    existing = tmp_path / "c.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(ValueError, match="exists"):
        scale_block_scales(smollm2_gguf, existing, "blk.0.ffn_down.weight", fraction=0.1, factor=2)
    assert existing.read_bytes() == b"keep"
    assert not list(tmp_path.glob(".*partial"))
