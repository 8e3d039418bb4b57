"""The five traceback causes of issue 11, each driven through the real `apr-tui`: every one
crashed with a Python traceback before the fix named in its docstring."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np

from engine.formats import apr, gguf
from engine.synth import synthesize
from engine.tokenizer import BpeTokenizer
from tests.hostile.conftest import DIMS, one_line_error, run_cli

NOT_UTF8 = os.fsdecode(b"m\xff.gguf")  # the name a user's file system may well hold


def spm_model(scores_edit=None, extra_pieces=()):
    """A llama model with a small SentencePiece vocabulary (byte pieces + a few merges)."""
    filler = [f"\u2581w{i}" for i in range(40)]  # synthesize needs >= 277 tokens
    pieces = ["\u2581h", "\u2581he", "ll", "llo", "\u2581hello", *filler, *extra_pieces]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    tok = BpeTokenizer(tokens=tokens, merges=[], token_types=types, kind="spm", scores=scores)
    if scores_edit is not None:
        scores_edit(tok.scores)  # after construction: the writer must carry what a file can hold
    base = synthesize("llama", seed=5, vocab_size=len(tokens), **DIMS)
    return replace(base, tokenizer=tok)


def test_trace_of_a_model_whose_name_is_not_utf8(apr_tui, files, tmp_path):
    """tokens.json recorded the model path with json.dumps(ensure_ascii=False) and encoded it
    as UTF-8: UnicodeEncodeError (surrogates not allowed). Now the undecodable byte is `\\xff`."""
    model = tmp_path / NOT_UTF8
    shutil.copyfile(files.gguf, model)
    out = tmp_path / "out"
    result = run_cli(
        apr_tui,
        "trace",
        model,
        "--save-tensor",
        "attn_norm",
        "--tokens",
        "1,2",
        "--save-tensor-dir",
        out,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "tokens.json").read_bytes().decode("utf-8"))
    assert document["model"].endswith("m\\xff.gguf")
    assert document["complete"] is True


def test_convert_of_a_model_whose_name_is_not_utf8(apr_tui, files, tmp_path):
    """The APR metadata's `source` and `name` carried the raw name: UnicodeEncodeError."""
    model = tmp_path / NOT_UTF8
    shutil.copyfile(files.gguf, model)
    out = tmp_path / "out.apr"
    result = run_cli(apr_tui, "convert", model, out)
    assert result.returncode == 0, result.stderr
    meta = apr.read_structure(out).metadata
    assert meta["source"] == "m\\xff.gguf"


def test_convert_of_sentencepiece_scores_with_minus_infinity(apr_tui, tmp_path):
    """json.dumps(allow_nan=False) of a -Inf score: ValueError traceback. -Inf is stored as the
    most negative f32, which keeps the merge order; the vocabulary is embedded."""

    def edit(scores):
        scores[-1] = -math.inf

    source = gguf.write(spm_model(edit), tmp_path / "spm.gguf")
    out = tmp_path / "spm.apr"
    result = run_cli(apr_tui, "convert", source, out)
    assert result.returncode == 0, result.stderr
    scores = apr.read_structure(out).metadata["tokenizer.scores"]
    assert scores[-1] == -float(np.finfo(np.float32).max)
    assert scores[-2] == -float(len(scores) - 259 - 2)


def test_convert_of_sentencepiece_scores_with_nan(apr_tui, tmp_path):
    """A NaN score has no order: the vocabulary is refused (the weights still convert) and the
    convert output says why the tokenizer was not embedded. Was: ValueError traceback."""

    def edit(scores):
        scores[262] = math.nan

    source = gguf.write(spm_model(edit), tmp_path / "spm.gguf")
    out = tmp_path / "spm.apr"
    result = run_cli(apr_tui, "convert", source, out, text=True)
    assert result.returncode == 0, result.stderr
    assert "tokenizer not embedded" in result.stderr  # a warning: not in the piped report
    assert "score of token 262 is NaN" in result.stderr
    assert "tokenizer.scores" not in apr.read_structure(out).metadata


def test_convert_of_an_apr_whose_scores_hold_nan_literals(apr_tui, tmp_path):
    """APR metadata is JSON, and Python's json accepts `NaN` / `-Infinity`: the same crash
    came from an APR input."""
    from tests.formats.apr_bytes import apr_file

    model = spm_model()
    source = apr.write(model, tmp_path / "spm.apr")
    structure = apr.read_structure(source)
    meta = dict(structure.metadata)
    meta["tokenizer.scores"] = [*meta["tokenizer.scores"][:-1], -math.inf]
    text = json.dumps(meta, separators=(",", ":"))  # allow_nan: writes -Infinity
    assert "-Infinity" in text
    tensors = [
        (
            e.name,
            e.dtype,
            e.shape,
            bytes(structure.buf[structure.header.data_offset + e.offset :][: e.size]),
        )
        for e in structure.entries
    ]
    hostile = tmp_path / "hostile.apr"
    hostile.write_bytes(apr_file(text.encode(), tensors))
    result = run_cli(apr_tui, "convert", hostile, tmp_path / "out.apr")
    assert result.returncode == 0, result.stderr


def test_save_tensor_layers_with_5000_digits(apr_tui, files, tmp_path):
    """int() of a 5000-digit string raises (Python's int-string limit): ValueError traceback."""
    result = run_cli(
        apr_tui,
        "trace",
        files.apr,
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "0.." + "9" * 5000,
        "--save-tensor-dir",
        tmp_path / "out",
    )
    one_line_error(result, "save-tensor layer range invalid", "is not a valid u32")
    assert not (tmp_path / "out").exists()


def test_explorer_layers_with_5000_digits(apr_tui, files):
    result = run_cli(apr_tui, files.apr, "--layers", "1" * 5000 + "..2")
    one_line_error(result, "--layers", "is not a valid u32")


def test_prompt_that_is_not_utf8(apr_tui, files, tmp_path):
    """tokenizers got a str with a lone surrogate: TypeError: TextInputSequence must be str."""
    result = run_cli(
        apr_tui,
        "trace",
        files.hf_dir,
        "--save-tensor",
        "attn_norm",
        "--prompt",
        b"caf\xe9",
        "--save-tensor-dir",
        tmp_path / "out",
    )
    one_line_error(result, "--prompt", "not valid UTF-8", "0xe9")
    assert not (tmp_path / "out").exists()
    bisect = run_cli(apr_tui, "bisect", files.apr, files.gguf, "--prompt", b"\xff")
    one_line_error(bisect, "--prompt", "not valid UTF-8")
    # The explorer and the demo refuse it before any screen opens.
    explorer = run_cli(apr_tui, files.apr, "--ref", files.gguf, "--prompt", b"x\xfey")
    one_line_error(explorer, "--prompt", "not valid UTF-8", "0xfe")
    demo = run_cli(apr_tui, "demo", "--small", "--prompt", b"\xff")
    one_line_error(demo, "--prompt", "not valid UTF-8")


def test_shard_index_whose_weight_map_is_not_an_object(apr_tui, files, tmp_path):
    """`index["weight_map"].values()` on a list: AttributeError traceback."""
    hf = tmp_path / "hf"
    shutil.copytree(files.hf_dir, hf)
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    for weight_map in (["model-00001-of-00001.safetensors"], "x", 7, None):
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        result = run_cli(apr_tui, "convert", hf, tmp_path / "out.apr")
        one_line_error(result, "model.safetensors.index.json", '"weight_map" object')
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x\u0000"}}))
    result = run_cli(apr_tui, "convert", hf, tmp_path / "out.apr")
    one_line_error(result, "model.safetensors.index.json", "shard file name")
    assert not (tmp_path / "out.apr").exists()
