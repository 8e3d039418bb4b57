"""Seeded mutations of every format we read, through the parsers in-process (CASES per family)
and through the real `apr-tui` for a sample (SUBPROCESS_CASES per family). See conftest.py for
the contract each case keeps."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from functools import partial
from pathlib import Path

import pytest

from engine.aprt import read_aprt
from engine.formats import apr, open_model
from engine.forward import trace
from engine.tokenizer import encode_prompt
from engine.trace_directory import read_tokens_json, read_trace_dir
from tests.formats.apr_bytes import apr_file
from tests.fuzz.conftest import (
    CASES,
    SUBPROCESS_CASES,
    assert_cli_contract,
    dumps,
    expect_contract,
    mutate_bytes,
    mutate_gguf,
    mutate_json,
    rng_for,
    run_apr_tui,
)


def exercise_model(path: Path) -> None:
    """What the commands do with a model: open, decode every weight, encode the default
    prompt, run a two-token forward pass capturing every stage, and convert it to APR."""
    with open_model(path) as model:
        for name in model.weights.names():
            model.weights.get(name)
        if model.tokenizer is not None:
            encode_prompt(model, "What is 2+2?")
        for _ in trace(model, [1, 2]):
            pass
        out = apr.write(model, path.parent / "converted.apr")
    valid_apr(out)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- APRT, tokens


def aprt_case(originals, rng, root: Path) -> Path:
    directory = root / "trace"
    write(directory / "layer-0" / "attn_norm.bin", mutate_bytes(originals.aprt, rng, focus=16))
    write(directory / "tokens.json", json.dumps(originals.tokens))
    return directory


def test_aprt_files(originals, tmp_path):
    rng = rng_for("aprt")
    for case in range(CASES):
        directory = aprt_case(originals, rng, tmp_path / str(case))
        file = directory / "layer-0" / "attn_norm.bin"
        label = f"aprt case {case}"
        expect_contract(label, partial(read_aprt, file), str(file))
        expect_contract(label, partial(read_trace_dir, directory), str(directory))
        expect_contract(label, partial(read_trace_dir, directory, strict=False), str(directory))


def tokens_case(originals, rng, root: Path) -> Path:
    directory = root / "trace"
    write(directory / "layer-0" / "attn_norm.bin", originals.aprt)
    if rng.random() < 0.7:
        text = dumps(mutate_json(originals.tokens, rng))
    else:
        text = mutate_bytes(json.dumps(originals.tokens).encode(), rng).decode("latin-1")
    write(directory / "tokens.json", text)
    return directory


def test_tokens_json(originals, tmp_path):
    rng = rng_for("tokens")
    for case in range(CASES):
        directory = tokens_case(originals, rng, tmp_path / str(case))
        label = f"tokens.json case {case}"
        expect_contract(label, partial(read_tokens_json, directory / "tokens.json"), "tokens.json")
        expect_contract(label, partial(read_trace_dir, directory), str(directory))


# ----------------------------------------------------------------------------- models


def gguf_case(originals, rng, root: Path) -> Path:
    """Raw byte edits of the header, or field-level edits (gguf-py locates the fields)."""
    if rng.random() < 0.3:
        data = mutate_bytes(originals.gguf, rng, focus=originals.gguf_header)
    else:
        data = mutate_gguf(originals.gguf, originals.gguf_layout, rng)
    return write(root / "m.gguf", data)


def gguf_spm_case(originals, rng, root: Path) -> Path:
    """A SentencePiece GGUF with field-level edits (scores NaN/Inf, pieces, ids)."""
    return write(root / "m.gguf", mutate_gguf(originals.gguf_spm, originals.gguf_spm_layout, rng))


def apr_case(originals, rng, root: Path) -> Path:
    """A raw mutation of the head, or one with both CRCs fixed so it reaches the metadata,
    index and offset checks, or the metadata JSON mutated and the file rebuilt around it."""
    if rng.random() < 0.4:
        structure = apr.read_structure(originals.apr_path)
        meta = mutate_json(structure.metadata, rng)
        tensors = [
            (
                e.name,
                e.dtype,
                e.shape,
                bytes(structure.buf[structure.header.data_offset + e.offset :][: e.size]),
            )
            for e in structure.entries
        ]
        return write(root / "m.apr", apr_file(dumps(meta).encode(), tensors))
    data_offset = struct.unpack_from("<Q", originals.apr, 32)[0]
    data = bytearray(mutate_bytes(originals.apr, rng, focus=data_offset))
    if len(data) >= 68 and rng.random() < 0.6:
        struct.pack_into("<I", data, 40, zlib.crc32(bytes(data[0:40]) + bytes(data[44:64])))
        struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    return write(root / "m.apr", bytes(data))


def safetensors_case(originals, rng, root: Path) -> Path:
    """An HF directory whose safetensors header, bytes or config.json is mutated."""
    hf = root / "hf"
    shutil.copytree(originals.hf_dir, hf)
    data = originals.safetensors
    kind = rng.choice(["header", "bytes", "config"])
    if kind == "header":
        (length,) = struct.unpack_from("<Q", data, 0)
        header = mutate_json(json.loads(data[8 : 8 + length]), rng)
        encoded = dumps(header).encode()
        data = struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]
    elif kind == "bytes":
        (length,) = struct.unpack_from("<Q", data, 0)
        data = mutate_bytes(data, rng, focus=8 + length)
    else:
        write(hf / "config.json", dumps(mutate_json(originals.config, rng)))
    write(hf / "model.safetensors", data)
    return hf


def hf_case(originals, rng, root: Path) -> Path:
    """An HF directory with a mutated shard index, tokenizer.json or tokenizer_config.json."""
    hf = root / "hf"
    shutil.copytree(originals.hf_dir, hf)
    kind = rng.choice(["index", "tokenizer", "tokenizer_config"])
    if kind == "index":
        (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
        index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00001.safetensors"}}
        write(hf / "model.safetensors.index.json", dumps(mutate_json(index, rng)))
    elif kind == "tokenizer":
        write(hf / "tokenizer.json", dumps(mutate_json(originals.tokenizer, rng)))
    else:
        write(hf / "tokenizer_config.json", dumps(mutate_json({"add_bos_token": True}, rng)))
    return hf


MODEL_FAMILIES = {
    "gguf": gguf_case,
    "gguf-spm": gguf_spm_case,
    "apr": apr_case,
    "safetensors": safetensors_case,
    "hf": hf_case,
}


@pytest.mark.parametrize("family", list(MODEL_FAMILIES))
def test_model_formats(originals, tmp_path, family):
    rng = rng_for(family)
    make = MODEL_FAMILIES[family]
    for case in range(CASES):
        path = make(originals, rng, tmp_path / str(case))
        expect_contract(f"{family} case {case}", partial(exercise_model, path), str(path))


# ----------------------------------------------------------------------------- the real CLI


def valid_apr(path: Path) -> None:
    apr.verify_footer(path)
    with open_model(path):
        pass


@pytest.mark.parametrize("family", list(MODEL_FAMILIES))
def test_model_formats_through_apr_tui(apr_tui, originals, tmp_path, family):
    """convert and trace on mutated models: exit 0 with a valid output, or one line."""
    rng = rng_for(f"{family}-cli")
    make = MODEL_FAMILIES[family]
    for case in range(SUBPROCESS_CASES):
        root = tmp_path / str(case)
        path = make(originals, rng, root)
        label = f"{family} cli case {case}"
        out = root / "out.apr"
        result = run_apr_tui(apr_tui, ["convert", path, out])
        assert_cli_contract(label, result, str(path))
        if result.code == 0:
            valid_apr(out)
        traced = root / "traced"
        result = run_apr_tui(
            apr_tui,
            ["trace", path, "--save-tensor", "all", "--tokens", "1,2", "--save-tensor-dir", traced],
        )
        assert_cli_contract(label, result, str(path))
        if result.code == 0:
            assert read_trace_dir(traced).complete is True
        else:
            assert not traced.exists()  # a failed run into a new directory leaves nothing


def test_trace_files_through_apr_tui(apr_tui, originals, tmp_path):
    """diff and bisect against mutated APRT files and tokens.json."""
    rng = rng_for("aprt-cli")
    for case in range(SUBPROCESS_CASES):
        root = tmp_path / str(case)
        directory = aprt_case(originals, rng, root / "a")
        good = write(root / "good.bin", originals.aprt)
        label = f"aprt cli case {case}"
        result = run_apr_tui(apr_tui, ["diff", directory / "layer-0" / "attn_norm.bin", good])
        assert_cli_contract(label, result, "attn_norm.bin")
        if result.code == 0:
            assert "cosine" in result.stdout.lower()
        directory = tokens_case(originals, rng, root / "b")
        result = run_apr_tui(apr_tui, ["bisect", originals.apr_path, directory])
        assert_cli_contract(label, result, str(directory), ok=(0, 1))
