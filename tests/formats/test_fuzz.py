"""Mutated headers, fed to each reader, give only our typed errors (or a model): never a crash."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import AprTuiError
from engine.formats import apr, gguf, open_model, safetensors
from engine.synth import synthesize

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fuzz-originals")
    model = synthesize("qwen2", seed=1, vocab_size=300, **TINY)
    hf = safetensors.write(model, root / "hf")
    return {
        "apr": apr.write(model, root / "m.apr").read_bytes(),
        "gguf": gguf.write(model, root / "m.gguf").read_bytes(),
        "safetensors": (hf / "model.safetensors").read_bytes(),
        "config": (hf / "config.json").read_bytes(),
    }


mutations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=4095), st.integers(min_value=0, max_value=255)),
    min_size=1,
    max_size=8,
)


def mutate(data: bytes, edits, limit: int) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % min(limit, len(out))] = value
    return bytes(out)


def open_only_typed_errors(path) -> None:
    try:
        with open_model(path) as model:
            for name in model.weights.names()[:3]:
                model.weights.get(name)
            if model.tokenizer is not None:
                model.tokenizer.encode("What is 2+2?")
    except AprTuiError as error:
        assert "\n" not in str(error)
        assert str(path.name) in str(error) or "tensor" in str(error)


@SETTINGS
@given(
    edits=mutations,
    fix_crc=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=8000)),
)
def test_apr_mutations(originals, tmp_path, edits, fix_crc, cut):
    data = originals["apr"]
    head_end = struct.unpack_from("<Q", data, 32)[0]  # everything before the tensor data
    data = bytearray(mutate(data, edits, head_end))
    if fix_crc:  # get past the CRC check so the mutation reaches the metadata and index parsers
        struct.pack_into("<I", data, 40, zlib.crc32(bytes(data[0:40]) + bytes(data[44:64])))
    if cut is not None:
        data = data[:cut]
    path = tmp_path / "fuzz.apr"
    path.write_bytes(bytes(data))
    open_only_typed_errors(path)


@SETTINGS
@given(edits=mutations, cut=st.one_of(st.none(), st.integers(min_value=0, max_value=8000)))
def test_gguf_mutations(originals, tmp_path, edits, cut):
    data = originals["gguf"]
    data = mutate(data, edits, gguf.read_header_size(data))
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data if cut is None else data[:cut])
    open_only_typed_errors(path)


@SETTINGS
@given(edits=mutations, cut=st.one_of(st.none(), st.integers(min_value=0, max_value=4000)))
def test_safetensors_mutations(originals, tmp_path, edits, cut):
    data = originals["safetensors"]
    header_end = 8 + struct.unpack_from("<Q", data, 0)[0]
    data = mutate(data, edits, header_end)
    directory = tmp_path / "hf"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_bytes(originals["config"])
    path = directory / "model.safetensors"
    path.write_bytes(data if cut is None else data[:cut])
    open_only_typed_errors(path)
