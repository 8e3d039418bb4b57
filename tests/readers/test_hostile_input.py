"""Hostile input to the real `apr-tui diff` / `apr-tui convert`: one stderr line, exit 2, no hang.

Each test here failed before the review's fix (a traceback, a hang, a misleading message, or a
file replaced that the user did not ask to write); the fix is named in each docstring.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.aprt import write_aprt
from tests.formats.apr_bytes import ROW_MAJOR, apr_file, header
from tests.readers.conftest import assert_one_line_error

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo (POSIX) needed")

DEEP_JSON = "[" * 100_000  # RecursionError inside json.loads
HUGE_INT = "1" * 5000  # ValueError: beyond Python's 4300-digit int limit


def trace_dir(root: Path, values: np.ndarray) -> Path:
    """A one-stage trace directory written with the real APRT writer."""
    (root / "layer-0").mkdir(parents=True)
    write_aprt(root / "layer-0" / "attn_norm.bin", 0, values)
    return root


@pytest.fixture
def two_traces(tmp_path) -> tuple[Path, Path]:
    values = np.arange(8, dtype=np.float32)
    return trace_dir(tmp_path / "a", values), trace_dir(tmp_path / "b", values[::-1].copy())


# ----------------------------------------------------------------------------- never block


@needs_fifo
def test_convert_refuses_a_fifo_instead_of_blocking(run, tmp_path):
    """detect_format opened the path with a blocking open(): a FIFO hung `convert` forever."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    result = run("convert", fifo, tmp_path / "out.apr")
    assert_one_line_error(result, f"{fifo}: cannot read: not a regular file")
    assert not (tmp_path / "out.apr").exists()


@needs_fifo
def test_convert_refuses_a_fifo_safetensors_shard(run, llama_files, tmp_path):
    """The HF-directory glob picked up a FIFO named *.safetensors and blocked reading it."""
    hf = tmp_path / "hf"
    shutil.copytree(llama_files["safetensors"], hf)
    (hf / "model.safetensors").unlink()
    os.mkfifo(hf / "model.safetensors")
    result = run("convert", hf, tmp_path / "out.apr")
    assert_one_line_error(result, f"{hf / 'model.safetensors'}: cannot read: not a regular file")


@needs_fifo
def test_diff_refuses_a_fifo_tokens_json(run, two_traces):
    """read_tokens_json used Path.read_text, which blocks on a FIFO."""
    a, b = two_traces
    os.mkfifo(a / "tokens.json")
    result = run("diff", a, b)
    assert_one_line_error(result, f"{a / 'tokens.json'}: cannot read: not a regular file")


# ----------------------------------------------------------------------------- hostile JSON


@pytest.mark.parametrize(
    ("text", "reason"),
    [(DEEP_JSON, "nested too deeply"), ('{"token_ids": [' + HUGE_INT + "]}", "Exceeds the limit")],
    ids=["deep", "huge-int"],
)
def test_diff_hostile_tokens_json(run, two_traces, text, reason):
    """json.loads raised RecursionError / ValueError, which escaped as a traceback."""
    a, b = two_traces
    (a / "tokens.json").write_text(text)
    result = run("diff", a, b)
    assert_one_line_error(result, f"{a / 'tokens.json'}: not valid JSON ({reason}")


@pytest.mark.parametrize(
    ("text", "reason"),
    [(DEEP_JSON, "nested too deeply"), (HUGE_INT, "Exceeds the limit")],
    ids=["deep", "huge-int"],
)
def test_convert_hostile_config_json(run, llama_files, tmp_path, text, reason):
    hf = tmp_path / "hf"
    shutil.copytree(llama_files["safetensors"], hf)
    (hf / "config.json").write_text(text)
    result = run("convert", hf, tmp_path / "out.apr")
    assert_one_line_error(result, f"{hf / 'config.json'}: unreadable config.json: {reason}")


def test_convert_hostile_shard_index(run, llama_files, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(llama_files["safetensors"], hf)
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    (hf / "model.safetensors.index.json").write_text(DEEP_JSON)
    result = run("convert", hf, tmp_path / "out.apr")
    assert_one_line_error(result, "model.safetensors.index.json: unreadable shard index: nested")


def test_convert_hostile_safetensors_header(run, llama_files, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(llama_files["safetensors"], hf)
    body = DEEP_JSON.encode()
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    result = run("convert", hf, tmp_path / "out.apr")
    assert_one_line_error(
        result, "model.safetensors: safetensors header is not valid JSON: nested too deeply"
    )


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (DEEP_JSON.encode(), "nested too deeply"),
        (b'{"hidden_size": ' + HUGE_INT.encode() + b"}", "Exceeds the limit"),
    ],
    ids=["deep", "huge-int"],
)
def test_convert_hostile_apr_metadata(run, tmp_path, metadata, reason):
    source = tmp_path / "bad.apr"
    source.write_bytes(apr_file(metadata, []))
    result = run("convert", source, tmp_path / "out.apr")
    assert_one_line_error(result, f"{source}: APR metadata is not valid JSON: {reason}")


# ----------------------------------------------------------------------------- GGUF metadata


def _gguf(path: Path, edit) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    edit(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_convert_gguf_non_finite_integer_metadata(run, tmp_path, value):
    """`value != int(value)` raised ValueError / OverflowError for NaN / Inf: a traceback."""

    def edit(writer):
        writer.add_float32("llama.embedding_length", value)
        writer.add_uint32("llama.attention.head_count", 4)

    source = _gguf(tmp_path / "bad.gguf", edit)
    result = run("convert", source, tmp_path / "out.apr")
    assert_one_line_error(result, f"{source}: llama.embedding_length is {value}, expected an int")


def test_a_lying_key_length_is_quoted_short_in_the_error(run, tmp_path):
    """Was: the first key's length field set to 1,000 dumped 2 KB of the bytes after it into
    the one error line."""
    source = _gguf(tmp_path / "ok.gguf", lambda writer: writer.add_uint32("llama.block_count", 2))
    data = bytearray(source.read_bytes())
    first_key = 24  # magic, version, tensor count, key/value count; then the key's u64 length
    struct.pack_into("<Q", data, first_key, 1000)
    data += bytes(range(256)) * 8  # enough bytes after it for the lie to read
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    line = assert_one_line_error(run("convert", bad, tmp_path / "out.apr"), str(bad))
    assert "(1000 characters)" in line and len(line) < 400, line


def test_convert_gguf_scalar_embedding_without_vocab_size(run, tmp_path):
    """The vocabulary size fell back to `token_embd.shape[0]`: IndexError on a 0-d tensor."""

    def edit(writer):
        for key, number in (
            ("embedding_length", 64),
            ("attention.head_count", 4),
            ("block_count", 1),
            ("feed_forward_length", 128),
        ):
            writer.add_uint32(f"llama.{key}", number)
        writer.add_tensor("token_embd.weight", np.zeros((), dtype=np.float32))

    source = _gguf(tmp_path / "scalar.gguf", edit)
    result = run("convert", source, tmp_path / "out.apr")
    assert_one_line_error(result, f"{source}: vocab_size is 0")


# ----------------------------------------------------------------------------- memory


def test_zstd_bomb_is_refused_at_64_mib(run, tmp_path):
    """A 3 KiB zstd payload that inflates to 80 MiB: refused once it passes max(64 MiB, 256x
    the file). The limit used to be 1 GiB (and three copies of the output: 3 GiB RSS)."""
    import zstandard

    payload = zstandard.ZstdCompressor(level=1).compress(bytes(80 << 20))
    head = header(
        flags=ROW_MAJOR | 0x0002, tensor_count=0, metadata_size=2, index_offset=128, data_offset=128
    )
    source = tmp_path / "bomb.apr"
    source.write_bytes(head + payload)
    assert source.stat().st_size * 256 < 64 << 20
    result = run("convert", source, tmp_path / "out.apr")
    assert_one_line_error(result, f"{source}: zstd payload decompresses beyond {64 << 20} bytes")


# ----------------------------------------------------------------------------- output path


def test_converted_file_honours_the_umask(run, llama_files, tmp_path):
    """tempfile.mkstemp made every converted .apr mode 0600, unreadable by the user's group."""
    out = tmp_path / "out.apr"
    result = run("convert", llama_files["gguf"], out, "-q", preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.apr"]  # no temporary left behind


def test_convert_onto_its_input_says_so_before_asking_for_force(run, llama_files):
    """Without --force the message was "already exists; pass --force", which then failed too."""
    source = llama_files["apr"]
    before = source.read_bytes()
    result = run("convert", source, source)
    assert_one_line_error(result, f"{source}: is the input file; write to another name")
    assert source.read_bytes() == before


def test_convert_onto_a_hard_link_of_its_input(run, llama_files, tmp_path):
    """resolve() does not see hard links: with --force the link was replaced by the output."""
    link = tmp_path / "same.apr"
    os.link(llama_files["apr"], link)
    result = run("convert", llama_files["apr"], link, "--force")
    assert_one_line_error(result, f"{link}: is the input file")
    assert os.path.samefile(link, llama_files["apr"])


def test_convert_keeps_a_dangling_symlink_without_force(run, llama_files, tmp_path):
    """Path.exists() is False for a dangling link, so it was silently replaced by the output."""
    link = tmp_path / "out.apr"
    link.symlink_to(tmp_path / "elsewhere.apr")
    result = run("convert", llama_files["gguf"], link)
    assert_one_line_error(result, f"{link}: already exists; pass --force to replace it")
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "elsewhere.apr")


def test_convert_into_a_directory_is_named_as_one(run, llama_files, tmp_path):
    """A directory as OUT was reported as "already exists; pass --force" (then refused anyway)."""
    result = run("convert", llama_files["gguf"], tmp_path)
    assert_one_line_error(result, f"{tmp_path}: is a directory, expected an .apr file name")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("convert", "", "out.apr"), "IN: empty path"),
        (("convert", "model.gguf", ""), "OUT.apr: empty path"),
        (("diff", "", "b.bin"), "A: empty path"),
    ],
)
def test_empty_path_arguments_are_named(run, tmp_path, args, message):
    """`convert "" out.apr` opened the current directory as an HF checkpoint."""
    result = run(*args, cwd=tmp_path)
    assert_one_line_error(result, message)


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("args", "prog"),
    [(("diff", "--bogus"), "apr-tui diff"), (("convert", "--bogus=1"), "apr-tui convert")],
)
def test_an_unknown_flag_is_named_even_when_arguments_are_missing(run, args, prog):
    """argparse reported the missing positionals ("A, B are required") and not the bad flag."""
    result = run(*args)
    assert_one_line_error(result, f"{prog}: unrecognized arguments: {args[1]}")


def test_an_unknown_top_level_flag_is_named(run):
    result = run("--bogus")
    assert_one_line_error(result, "apr-tui: unrecognized arguments: --bogus")


def test_abbreviated_flags_still_work(run, tmp_path):
    """The unknown-flag check must not reject what argparse accepts (--lim for --limit)."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    write_aprt(a, 0, np.array([1.0, 2.0, 3.0], dtype=np.float32))
    write_aprt(b, 0, np.array([1.0, 2.5, 3.0], dtype=np.float32))
    result = run("diff", a, b, "--lim", "1", "--js")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [entry["index"] for entry in document["top_diffs"]] == [1]


def test_output_the_terminal_cannot_encode_does_not_crash(run, tmp_path):
    """With PYTHONIOENCODING=ascii a non-ASCII path raised UnicodeEncodeError from print()."""
    values = np.array([1.0, 2.0], dtype=np.float32)
    a, b = trace_dir(tmp_path / "é", values), trace_dir(tmp_path / "b", values)
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    table = run("diff", a, b, env=env)
    assert table.returncode == 0, table.stderr
    assert "1 stage(s) compared, 0 below cosine" in table.stdout
    file_a, file_b = (side / "layer-0" / "attn_norm.bin" for side in (a, b))
    as_json = run("diff", file_a, file_b, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["path_a"] == str(file_a)


@pytest.mark.parametrize(("text", "accepted"), [("1_0", False), (" 5", False), ("+2", True)])
def test_limit_parses_as_rust_usize(run, tmp_path, text, accepted):
    """`--limit` went through int(), which also takes `1_0` and ` 5`; clap's usize does not."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    write_aprt(a, 0, np.array([1.0, 2.0, 3.0], dtype=np.float32))
    write_aprt(b, 0, np.array([1.5, 2.0, 3.5], dtype=np.float32))
    result = run("diff", a, b, "--json", "--limit", text)
    if accepted:
        assert result.returncode == 0, result.stderr
        assert [entry["index"] for entry in json.loads(result.stdout)["top_diffs"]] == [0, 2]
    else:
        assert_one_line_error(result, f"argument --limit: expected a whole number, got {text!r}")


@needs_fifo
def test_convert_never_replaces_a_non_regular_file(run, llama_files, tmp_path):
    """With --force, OUT=/dev/null (as root) was replaced by a regular file via rename; a FIFO
    stands in for the device here."""
    fifo = tmp_path / "out.apr"
    os.mkfifo(fifo)
    result = run("convert", llama_files["gguf"], fifo, "--force")
    assert_one_line_error(result, f"{fifo}: is not a regular file; refusing to replace it")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out.apr"]


def test_a_5000_digit_token_id_is_refused(run, llama_files, tmp_path):
    """parse_token_ids called int() on it: ValueError (Python's 4300-digit limit), a traceback."""
    result = run(
        "trace", llama_files["gguf"], "--save-tensor", "attn_norm", "--save-tensor-dir",
        tmp_path / "trace", "--tokens", "1" * 5000,
    )  # fmt: skip
    assert_one_line_error(
        result,
        "--tokens: 11111111111111111111... (5000 digits) at position 1 is too large for a token "
        "id (max 4294967295)",
    )
    assert not (tmp_path / "trace").exists()


def copy_gguf(source: Path, target: Path, extra: dict[str, np.ndarray]) -> Path:
    """`source` rewritten by gguf.GGUFWriter with every key and tensor, plus `extra` tensors."""
    reader = gguf.GGUFReader(source)

    def edit(writer):
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            is_array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(
                field.name, field.contents(), field.types[0], field.types[-1] if is_array else None
            )
        for tensor in reader.tensors:
            shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGML order -> row-major
            writer.add_tensor(tensor.name, np.array(tensor.data).reshape(shape))
        for name, values in extra.items():
            writer.add_tensor(name, values)

    return _gguf(target, edit)


def test_a_bias_the_forward_pass_would_drop_is_refused(run, llama_files, tmp_path):
    """A GGUF `blk.0.attn_output.bias` had no canonical name, so the model opened (and converted)
    without it: every trace of it silently wrong. Now the reader maps it and refuses it."""
    plain = copy_gguf(llama_files["gguf"], tmp_path / "plain.gguf", {})
    assert run("convert", plain, tmp_path / "plain.apr", "-q").returncode == 0
    biased = copy_gguf(
        llama_files["gguf"],
        tmp_path / "bias.gguf",
        {"blk.0.attn_output.bias": np.full(256, 5.0, dtype=np.float32)},
    )
    result = run("convert", biased, tmp_path / "out.apr")
    assert_one_line_error(
        result,
        f"{biased}: tensor 'model.layers.0.self_attn.o_proj.bias' is a bias the llama forward "
        "pass does not apply",
    )
    assert not (tmp_path / "out.apr").exists()
