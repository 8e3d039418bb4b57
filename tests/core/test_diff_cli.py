"""`apr-tui diff`, run as the installed command in a subprocess."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.aprt import write_stage
from engine.trace_directory import write_tokens_json
from tests.conftest import apr_tui_argv

WHOLE = 0xFFFFFFFF


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1"}
    return subprocess.run(
        [*apr_tui_argv(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def aprt(path: Path, layer: int, values: list[float]) -> Path:
    """An APRT file built with struct, independent of engine.aprt's writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = struct.pack(f"<{len(values)}f", *values)
    path.write_bytes(b"APRT" + struct.pack("<II", layer, len(values)) + body)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr == f"apr-tui: error: {message}\n"


# ----------------------------------------------------------------------------- help


def test_top_level_help_lists_diff():
    result = run("--help")
    assert result.returncode == 0
    assert "diff" in result.stdout and "apr diff --values" in result.stdout


def test_diff_help():
    result = run("diff", "--help")
    assert result.returncode == 0
    assert "usage: apr-tui diff" in result.stdout
    assert "--limit N" in result.stdout and "--json" in result.stdout
    assert "examples:" in result.stdout and "apr-stage-diff-v1" in result.stdout


# ----------------------------------------------------------------------------- file vs file


def test_file_json_is_apr_stage_diff_v1_byte_for_byte(tmp_path):
    a = aprt(tmp_path / "a.bin", 3, [1.0, 2.0, 3.0, 4.0])
    b = aprt(tmp_path / "b.bin", 3, [1.0, 2.5, 3.0, 4.0])
    result = run("diff", a, b, "--json", "--limit", "2")
    assert result.returncode == 0, result.stderr
    # cosine = 31 / sqrt(30 * 32.25), computed by hand and printed like serde_json (ryu)
    cosine = 31.0 / (30.0**0.5 * 32.25**0.5)
    assert result.stdout == (
        "{\n"
        f'  "cosine_sim": {cosine!r},\n'
        '  "dim_product": 4,\n'
        '  "layer": 3,\n'
        '  "max_abs_diff": 0.5,\n'
        '  "max_abs_diff_index": 1,\n'
        f'  "path_a": "{a}",\n'
        f'  "path_b": "{b}",\n'
        '  "rms_diff": 0.25,\n'
        '  "schema": "apr-stage-diff-v1",\n'
        '  "top_diffs": [\n'
        "    {\n"
        '      "a": 2.0,\n'
        '      "abs_diff": 0.5,\n'
        '      "b": 2.5,\n'
        '      "index": 1\n'
        "    },\n"
        "    {\n"
        '      "a": 1.0,\n'
        '      "abs_diff": 0.0,\n'
        '      "b": 1.0,\n'
        '      "index": 0\n'
        "    }\n"
        "  ]\n"
        "}\n"
    )


def test_file_json_whole_model_non_finite_and_f32_values(tmp_path):
    a = aprt(tmp_path / "a.bin", WHOLE, [float("nan"), 0.1, 0.0])
    b = aprt(tmp_path / "b.bin", WHOLE, [0.0, 0.0, 0.0])
    result = run("diff", a, b, "--json", "--limit", "0")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["layer"] == "whole-model"
    assert document["rms_diff"] is None  # NaN
    assert document["max_abs_diff_index"] == 1
    # limit 0 behaves as 1; the NaN at index 0 keeps its place (insertion-sort rule)
    assert document["top_diffs"] == [{"a": None, "abs_diff": None, "b": 0.0, "index": 0}]
    # an f32 is printed the way serde_json's json! prints it: widened to f64
    assert '"max_abs_diff": 0.10000000149011612' in result.stdout


def test_file_text_view(tmp_path):
    a = aprt(tmp_path / "a.bin", 0, [1.0, 2.0, 3.0, 4.0])
    b = aprt(tmp_path / "b.bin", 0, [1.0, 2.5, 3.0, 4.0])
    result = run("diff", a, b)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "APR STAGE TENSOR DIFF" in out
    assert "5.000000e-1 (at index 1)" in out
    assert "2.500000e-1" in out  # RMS
    assert "0.9966351658" in out  # cosine {:.10} of 31 / sqrt(30 * 32.25)
    assert "+2.000000e0" in out and "+2.500000e0" in out


def test_dim_product_mismatch_is_checked_before_layer(tmp_path):
    a = aprt(tmp_path / "a.bin", 0, [1.0, 2.0])
    b = aprt(tmp_path / "b.bin", 7, [1.0, 2.0, 3.0])
    assert_one_line_error(
        run("diff", a, b, "--json"),
        f"APRT dim_product mismatch: {a} has 2 f32s, {b} has 3 f32s — "
        "cannot compare stage tensors of different sizes",
    )


def test_layer_mismatch(tmp_path):
    a = aprt(tmp_path / "a.bin", 0, [1.0, 2.0])
    b = aprt(tmp_path / "b.bin", 7, [1.0, 2.0])
    assert_one_line_error(
        run("diff", a, b),
        f"APRT layer mismatch: {a} is layer 0, {b} is layer 7 — "
        "stages from different layers cannot be compared element-wise",
    )


def test_truncated_file_is_one_line_exit_2(tmp_path):
    a = aprt(tmp_path / "a.bin", 0, [1.0])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"APRT\0\0\0\0\1\0\0")
    assert_one_line_error(
        run("diff", a, bad),
        f"Cannot read APRT stage tensor {bad}: save-tensor header truncated: got 11 bytes, need 12",
    )


def test_corrupt_body_length_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"APRT" + struct.pack("<II", 0, 0xFFFFFFFF) + bytes(8))
    a = aprt(tmp_path / "a.bin", 0, [1.0])
    assert_one_line_error(
        run("diff", bad, a),
        f"Cannot read APRT stage tensor {bad}: save-tensor body length mismatch: "
        "header says 17179869180 bytes (4294967295 f32s), got 8",
    )


def test_not_an_aprt_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    a = aprt(tmp_path / "a.bin", 0, [1.0])
    # A model file given by mistake is named as such (issue 10), not by its raw magic bytes.
    assert_one_line_error(
        run("diff", a, gguf),
        f"{gguf}: this is a GGUF model, not an APRT stage file; compare a model with another "
        "model or a trace directory with `apr-tui bisect`",
    )
    other = tmp_path / "other.bin"
    other.write_bytes(b"NOPE" + bytes(20))
    assert_one_line_error(
        run("diff", a, other),
        f"Cannot read APRT stage tensor {other}: save-tensor magic mismatch: "
        "got [78, 79, 80, 69], expected [65, 80, 82, 84]",
    )


def test_missing_path(tmp_path):
    a = aprt(tmp_path / "a.bin", 0, [1.0])
    assert_one_line_error(
        run("diff", a, tmp_path / "nope.bin"),
        f"{tmp_path / 'nope.bin'}: no such file or directory",
    )


def test_file_against_directory_is_a_usage_error(tmp_path):
    a = aprt(tmp_path / "a.bin", 0, [1.0])
    assert_one_line_error(
        run("diff", tmp_path, a),
        f"cannot diff a file with a directory ({a} is a file, {tmp_path} is a directory): "
        "give two APRT files or two trace directories",
    )


@pytest.mark.parametrize(
    ("value", "reason"), [("-1", "must be >= 0, got -1"), ("ten", "expected a whole number")]
)
def test_bad_limit_is_a_usage_error(tmp_path, value, reason):
    a = aprt(tmp_path / "a.bin", 0, [1.0])
    result = run("diff", a, a, "--limit", value)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"argument --limit: {reason}" in result.stderr


# ----------------------------------------------------------------------------- dir vs dir


def make_pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    side_a, side_b = tmp_path / "A", tmp_path / "B"
    for layer in range(3):
        for stage in ("attn_norm", "ffn_out"):
            values = rng.standard_normal(32).astype(np.float32)
            write_stage(side_a, stage, layer, values)
            drift = 1.0 if (layer, stage) >= (1, "ffn_out") else 0.0
            write_stage(side_b, stage, layer, values + np.float32(drift) * values[::-1])
    logits = rng.standard_normal(50).astype(np.float32)
    write_stage(side_a, "lm_head", 0, logits)
    write_stage(side_b, "lm_head", 0, logits)
    write_stage(side_a, "embedding", 0, np.ones(8, np.float32))  # only in A
    write_stage(side_a, "ffn_up", 2, np.ones(4, np.float32))
    write_stage(side_b, "ffn_up", 2, np.ones(5, np.float32))  # size mismatch
    (side_b / "stray.txt").write_text("?")
    write_tokens_json(side_a, [1, 2, 3], "What is 2+2?", None)
    write_tokens_json(side_b, [1, 2, 3], "What is 2+2?", None)
    return side_a, side_b


def test_directory_diff_json(tmp_path):
    side_a, side_b = make_pair(tmp_path)
    result = run("diff", side_a, side_b, "--json", "--limit", "3")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == "apr-tui-dir-diff-v1"
    assert document["first_divergence"] == {"layer": 1, "stage": "ffn_out"}
    assert document["tokens_match"] is True and document["token_ids_a"] == [1, 2, 3]
    keys = [(entry["layer"], entry["stage"]) for entry in document["stages"]]
    assert keys == [
        (0, "attn_norm"),
        (0, "ffn_out"),
        (1, "attn_norm"),
        (1, "ffn_out"),
        (2, "attn_norm"),
        (2, "ffn_up"),
        (2, "ffn_out"),
        ("whole-model", "lm_head"),
    ]
    by_key = {(e["layer"], e["stage"]): e for e in document["stages"]}
    assert by_key[(0, "attn_norm")]["cosine_sim"] == pytest.approx(1.0, abs=1e-12)
    assert by_key[(0, "attn_norm")]["max_abs_diff"] == 0.0
    assert by_key[(1, "ffn_out")]["cosine_sim"] < 0.999
    assert len(by_key[(1, "ffn_out")]["top_diffs"]) == 3
    assert by_key[(2, "ffn_up")]["error"].startswith("APRT dim_product mismatch: ")
    assert "cosine_sim" not in by_key[(2, "ffn_up")]
    assert document["only_in_a"] == [
        {"layer": 0, "path": str(side_a / "layer-0" / "embedding.bin"), "stage": "embedding"}
    ]
    assert document["only_in_b"] == []
    assert document["unknown_b"] == [
        {"path": str(side_b / "stray.txt"), "reason": "not a .bin stage file"}
    ]


def test_directory_diff_table(tmp_path):
    side_a, side_b = make_pair(tmp_path)
    result = run("diff", side_a, side_b)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "post_ffn_residual" not in out
    assert "whole-model" in out and "lm_head" in out
    assert "first divergence: layer 1 ffn_out" in out
    assert "7 stage(s) compared, 3 below cosine 0.999" in out
    assert "only in A (1):" in out and "layer-0/embedding.bin" in out
    assert "stray.txt: not a .bin stage file" in out
    assert "APRT dim_product mismatch" in out


def test_identical_all_zero_files_are_not_the_first_divergence(tmp_path):
    """apr's cosine of two zero tensors is 0.0, but equal files agree: the first divergence
    is the one bisect and the explorer find (engine.compare.cosine_diverged), not the zeros."""
    side_a, side_b = tmp_path / "A", tmp_path / "B"
    zeros = [0.0] * 4
    aprt(side_a / "layer-0" / "attn_norm.bin", 0, zeros)
    aprt(side_b / "layer-0" / "attn_norm.bin", 0, zeros)
    aprt(side_a / "layer-1" / "ffn_out.bin", 1, [1.0, 2.0, 3.0, 4.0])
    aprt(side_b / "layer-1" / "ffn_out.bin", 1, [4.0, 3.0, 2.0, 1.0])  # cosine 20/30
    result = run("diff", side_a, side_b, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["stages"][0]["cosine_sim"] == 0.0
    assert document["first_divergence"] == {"layer": 1, "stage": "ffn_out"}
    table = run("diff", side_a, side_b)
    assert "first divergence: layer 1 ffn_out" in table.stdout
    assert "2 stage(s) compared, 2 below cosine 0.999" in table.stdout  # the count is literal


def test_directories_with_nothing_in_common(tmp_path):
    write_stage(tmp_path / "A", "ffn_out", 0, [1.0])
    write_stage(tmp_path / "B", "ffn_out", 1, [1.0])
    assert_one_line_error(
        run("diff", tmp_path / "A", tmp_path / "B"),
        f"{tmp_path / 'A'} and {tmp_path / 'B'} have no (layer, stage) file in common",
    )


def test_directory_without_stage_files(tmp_path):
    (tmp_path / "A").mkdir()
    write_stage(tmp_path / "B", "ffn_out", 0, [1.0])
    result = run("diff", tmp_path / "A", tmp_path / "B")
    assert_one_line_error(
        result,
        f"{tmp_path / 'A'}: no APRT stage files (expected layer-<N>/<stage>.bin or "
        "final_norm.bin / lm_head.bin)",
    )


def test_malformed_tokens_json_in_a_directory(tmp_path):
    side_a, side_b = make_pair(tmp_path)
    (side_b / "tokens.json").write_text("[]")
    assert_one_line_error(
        run("diff", side_a, side_b), f"{side_b / 'tokens.json'}: expected a JSON object"
    )


def test_directories_traced_from_different_tokens_are_flagged(tmp_path):
    side_a, side_b = make_pair(tmp_path)
    write_tokens_json(side_b, [1, 2, 4], None, None)
    result = run("diff", side_a, side_b)
    assert result.returncode == 0, result.stderr
    assert "warning: the traces ran different tokens: A [1, 2, 3] vs B [1, 2, 4]" in result.stdout
    document = json.loads(run("diff", side_a, side_b, "--json").stdout)
    assert document["tokens_match"] is False and document["token_ids_b"] == [1, 2, 4]
