"""The seeded fuzz suite's machinery (issue 11): original files of every format we read, the
mutators, and the contract every case must keep.

The contract, for each mutated input:
  * in-process: the parser returns, or raises one of our typed errors (AprTuiError, or an
    OSError the command line turns into one line) whose message is one line naming the file or
    flag; never another exception; the case's peak Python allocation stays under MAX_ALLOC and
    it ends within CASE_LIMIT seconds (an alarm turns a hang into a failure, not a timing claim);
  * through the real `apr-tui` (a sample of each family): exit 0 with valid output, or exit 2
    with exactly one stderr line naming the file or flag; no traceback; the child's peak RSS
    (from wait4) under MAX_RSS.

Everything is seeded: a failing case prints its family, seed and case number, and reruns the
same way.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import tracemalloc
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.errors import AprTuiError, printable

SEED = 20261201
"""One seed for the whole suite; each family derives its own stream from it."""

CASES = 40
"""In-process cases per family: bounded, so the suite stays well under a minute."""

SUBPROCESS_CASES = 1
"""Cases per family run through the real `apr-tui` (each costs an interpreter start)."""

CASE_LIMIT = 20
"""Seconds before a case counts as a hang (SIGALRM in-process, subprocess timeout)."""

MAX_ALLOC = 256 << 20
"""Peak bytes a single in-process case may allocate (tracemalloc sees numpy's buffers too)."""

MAX_RSS = 1 << 30
"""Peak resident size of one `apr-tui` child (an interpreter with numpy is ~100 MiB)."""

DIMS = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)

INTERESTING_INTS = [
    0,
    1,
    2,
    7,
    31,
    32,
    63,
    64,
    255,
    256,
    0x7FFF,
    0xFFFF,
    0x7FFFFFFF,
    0xFFFFFFFF,
    0x100000000,
    0x7FFFFFFFFFFFFFFF,
    0xFFFFFFFFFFFFFFFF,
]

HOSTILE_TEXT = [
    "",
    " ",
    "x\ny",
    "a\rb",
    "\x1b[31mred\x1b[0m",
    "\u2028",
    "9" * 5000,
    "\udcff",
    "..",
    "/",
    "\x00",
    "llama\n",
    "NaN",
    "-1",
    "0",
    "1e999",
]

HOSTILE_JSON_VALUES = [
    0,
    -1,
    1,
    2**64,
    -(2**63),
    1e308,
    -1e308,
    1e-320,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x\n\x1b[2J",
    "9" * 5000,
    [],
    {},
    None,
    True,
    False,
    [1, 2, 3],
    {"a": 1},
    0.5,
    "F32",
    "I32",
    "llama",
]


def rng_for(family: str) -> random.Random:
    return random.Random(f"{SEED}:{family}")


# ----------------------------------------------------------------------------- mutators


def mutate_bytes(data: bytes, rng: random.Random, focus: int | None = None) -> bytes:
    """1-6 edits of one of several kinds, biased to the first `focus` bytes (the header)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["flip", "byte", "int", "insert", "delete", "truncate", "dup"])
        limit = min(len(out), focus or len(out))
        at = rng.randrange(limit) if limit else 0
        if kind == "flip" and out:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == "byte" and out:
            out[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == "int" and len(out) >= 8:
            value = rng.choice(INTERESTING_INTS)
            width = rng.choice([4, 8])
            at = min(at - at % 4, len(out) - width)
            out[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == "insert":
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "delete" and out:
            del out[at : at + rng.randint(1, 16)]
        elif kind == "truncate":
            del out[rng.randrange(len(out) + 1) :]
        elif kind == "dup" and out:
            chunk = out[at : at + rng.randint(1, 64)]
            out[at:at] = chunk
    return bytes(out)


def mutate_json(document, rng: random.Random, edits: int | None = None):
    """The document with 1-3 values (at random paths) replaced by hostile ones, or keys
    dropped; returns a new document."""
    document = json.loads(json.dumps(document))
    for _ in range(edits or rng.randint(1, 3)):
        holder, key = _random_slot(document, rng)
        if holder is None:
            document = rng.choice(HOSTILE_JSON_VALUES)
            continue
        if isinstance(holder, dict) and rng.random() < 0.2:
            holder.pop(key, None)
        else:
            holder[key] = rng.choice(HOSTILE_JSON_VALUES)
    return document


def _random_slot(document, rng: random.Random):
    """A random (container, key) inside `document`: a depth (1-4) first, uniformly among the
    depths that exist, then a slot at that depth, so that a top-level key (`weight_map`) is as
    likely a target as one of ten thousand vocabulary entries."""
    levels: list[list[tuple[object, object]]] = []
    frontier = [document]
    for _ in range(4):
        slots = []
        for node in frontier:
            if isinstance(node, dict):
                slots.extend((node, key) for key in list(node)[:500])
            elif isinstance(node, list):
                slots.extend((node, index) for index in range(min(len(node), 500)))
        if not slots:
            break
        levels.append(slots)
        frontier = [holder[key] for holder, key in slots[:500]]
    if not levels:
        return None, None
    return rng.choice(rng.choice(levels))


def dumps(document) -> str:
    return json.dumps(document)  # NaN / Infinity literals included: Python's json reads them


# ----------------------------------------------------------------------------- the contract


class CaseHang(BaseException):
    """Raised by the alarm when one in-process case runs past CASE_LIMIT."""


@contextmanager
def bounded(case: str):
    """Run a case under an alarm and tracemalloc; fail naming `case` if it hangs or its peak
    allocation passes MAX_ALLOC."""

    def on_alarm(signum, frame):
        raise CaseHang(case)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_LIMIT)
    tracemalloc.start()
    try:
        yield
    except CaseHang:
        pytest.fail(f"{case}: still running after {CASE_LIMIT} s (a hang)", pytrace=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_ALLOC, f"{case}: peak allocation {peak >> 20} MiB"


def expect_contract(case: str, action: Callable[[], object], *names: str) -> str | None:
    """Run `action`; None when it returned, the message when it raised one of our errors.

    Any other exception fails the test, naming the case. The message must be one printable
    line (what the command line prints) and name one of `names` (a file or a flag).
    """
    with bounded(case):
        try:
            action()
        except (AprTuiError, OSError) as error:
            message = printable(str(error))
            assert message and "\n" not in message, f"{case}: {message!r}"
            if names:
                assert any(printable(name) in message for name in names), (
                    f"{case}: message names none of {names}: {message}"
                )
            return message
        except Exception as error:  # the bug this suite hunts
            pytest.fail(f"{case}: {type(error).__name__}: {error}", pytrace=False)
    return None


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    max_rss: int


_MEASURE = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF if os.waitstatus_to_exitcode(status) >= 0 else 128 - os.waitstatus_to_exitcode(status))
"""
"""A minimal interpreter that spawns the command and reports the child's own peak RSS.

wait4 straight from the test process would not do: a child's ru_maxrss counts the pages it
shared with its parent between fork and exec, so a test process that has loaded torch would
make every `apr-tui` look a gigabyte large."""


def run_apr_tui(apr_tui: list[str], args: list, cwd: Path | None = None) -> CliResult:
    """The real command in a subprocess, with its own peak RSS (see _MEASURE)."""
    import shutil
    import sys
    import tempfile

    argv = [*apr_tui, *(a if isinstance(a, bytes) else os.fspath(a) for a in args)]
    if not os.path.isabs(os.fsdecode(argv[0])):
        argv[0] = shutil.which(argv[0]) or argv[0]
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "rss")
        try:
            done = subprocess.run(
                [sys.executable, "-S", "-c", _MEASURE, report, *argv],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                timeout=CASE_LIMIT * 3,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"apr-tui {args}: still running after {CASE_LIMIT * 3} s", pytrace=False)
        with open(report) as handle:
            max_rss = int(handle.read()) * 1024  # KiB on Linux
    return CliResult(
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
        max_rss,
    )


def assert_cli_contract(
    case: str, result: CliResult, *names: str, ok: tuple[int, ...] = (0,)
) -> None:
    """`ok` exit codes (0; bisect's 1 = a divergence found) or exit 2 with one line."""
    assert "Traceback" not in result.stderr, f"{case}:\n{result.stderr}"
    assert result.max_rss < MAX_RSS, f"{case}: peak RSS {result.max_rss >> 20} MiB"
    if result.code in ok:
        return
    assert result.code == 2, f"{case}: exit {result.code}: {result.stderr}"
    lines = [line for line in result.stderr.splitlines() if not line.startswith("tracing ")]
    assert len(lines) == 1, f"{case}: {result.stderr}"
    if names:
        assert any(printable(name) in lines[0] for name in names), f"{case}: {lines[0]}"


# ----------------------------------------------------------------------------- originals


@dataclass(frozen=True)
class Originals:
    root: Path
    apr: bytes
    gguf: bytes
    gguf_header: int
    safetensors: bytes
    config: dict
    tokenizer: dict
    hf_dir: Path
    apr_path: Path
    aprt: bytes
    tokens: dict
    gguf_layout: GgufLayout
    gguf_spm: bytes
    gguf_spm_layout: GgufLayout


def spm_model():
    """A llama model with a SentencePiece (`llama`) vocabulary: byte pieces, merges by score."""
    from dataclasses import replace

    from engine.synth import synthesize
    from engine.tokenizer import BpeTokenizer

    pieces = [
        "\u2581h",
        "\u2581he",
        "ll",
        "llo",
        "\u2581hello",
        *(f"\u2581w{i}" for i in range(40)),
    ]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    tok = BpeTokenizer(tokens=tokens, merges=[], token_types=types, kind="spm", scores=scores)
    return replace(synthesize("llama", seed=6, vocab_size=len(tokens), **DIMS), tokenizer=tok)


@pytest.fixture(scope="session")
def originals(tmp_path_factory) -> Originals:
    from engine.aprt import write_aprt
    from engine.formats import apr, gguf, safetensors
    from engine.formats.gguf import read_header_size
    from engine.synth import synthesize
    from engine.trace_directory import read_tokens_json, write_tokens_json

    root = tmp_path_factory.mktemp("fuzz-originals")
    model = synthesize("qwen2", seed=4, **DIMS)
    hf = safetensors.write(model, root / "hf")
    apr_path = apr.write(model, root / "m.apr")
    gguf_path = gguf.write(model, root / "m.gguf")
    gguf_bytes = gguf_path.read_bytes()
    spm_path = gguf.write(spm_model(), root / "spm.gguf")
    aprt = write_aprt(root / "attn_norm.bin", 0, [[1.0, -2.0], [0.5, 3.0]]).read_bytes()
    tokens_path = write_tokens_json(root / "t", [1, 2, 3], "hi", "m.apr")
    assert read_tokens_json(tokens_path).complete is True
    return Originals(
        root=root,
        apr=apr_path.read_bytes(),
        gguf=gguf_bytes,
        gguf_header=read_header_size(gguf_bytes),
        safetensors=(hf / "model.safetensors").read_bytes(),
        config=json.loads((hf / "config.json").read_text()),
        tokenizer=json.loads((hf / "tokenizer.json").read_text()),
        hf_dir=hf,
        apr_path=apr_path,
        aprt=aprt,
        tokens=json.loads(tokens_path.read_text()),
        gguf_layout=gguf_layout(gguf_path),
        gguf_spm=spm_path.read_bytes(),
        gguf_spm_layout=gguf_layout(spm_path),
    )


# ----------------------------------------------------------------------------- structure-aware


@dataclass(frozen=True)
class GgufLayout:
    """Where the values of a GGUF file lie (from gguf-py's reader, an independent parser), so
    that mutations can hit fields instead of hoping random bytes do."""

    scalars: list[tuple[int, str]]
    """(byte offset, numpy dtype string) of every scalar metadata value and tensor-info number."""
    strings: list[tuple[int, int]]
    """(byte offset, length) of every string's content (metadata values, array items)."""
    tensor_offsets: list[int]
    """Byte offset of each tensor info's data-offset field."""
    offset_values: list[int]


def gguf_layout(path: Path) -> GgufLayout:
    import gguf as gguf_package
    import numpy as np

    reader = gguf_package.GGUFReader(path)
    base = reader.data.ctypes.data
    scalars, strings = [], []
    string_type = gguf_package.GGUFValueType.STRING
    for field in reader.fields.values():
        for index in field.data:
            part = field.parts[index]
            at = part.ctypes.data - base
            if field.types[-1] == string_type:
                strings.append((at, part.size))
            elif part.size == 1:
                scalars.append((at, part.dtype.str))
            elif part.dtype.kind in "fiu":  # a numeric array stored as one part
                for i in range(min(part.size, 64)):
                    scalars.append((at + i * part.dtype.itemsize, part.dtype.str))
    tensor_offsets, offset_values = [], []
    for tensor in reader.tensors:
        parts = tensor.field.parts
        for part in parts[2:]:  # n_dims, dims, type, offset
            at = part.ctypes.data - base
            for i in range(part.size):
                scalars.append((at + i * part.dtype.itemsize, part.dtype.str))
        tensor_offsets.append(parts[-1].ctypes.data - base)
        offset_values.append(int(np.asarray(parts[-1])[0]))
    return GgufLayout(scalars, strings, tensor_offsets, offset_values)


HOSTILE_STRING_BYTES = [b"\n", b"\r", b"\x1b[2J", b"\xff\xfe", b"\x00", b"\xc3", b" "]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e38, 3.5e38, 1e-45, -0.0]


def mutate_gguf(data: bytes, layout: GgufLayout, rng: random.Random) -> bytes:
    """1-3 field-level edits: a scalar set to a hostile value of its type, a string's bytes
    replaced (same length) by control characters or invalid UTF-8, a tensor's data offset
    misaligned or pointed at another tensor's data."""
    import numpy as np

    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["scalar", "scalar", "string", "offset"])
        if kind == "scalar" and layout.scalars:
            at, dtype = rng.choice(layout.scalars)
            kind_char = np.dtype(dtype).kind
            if kind_char == "f":
                with np.errstate(over="ignore"):  # 3.5e38 as f16 is meant to become inf
                    value = np.array([rng.choice(HOSTILE_FLOATS)], dtype=dtype)
            elif kind_char == "b":
                value = np.array([rng.choice([0, 1, 2, 255])], dtype="u1")
            else:
                width = np.dtype(dtype).itemsize
                raw = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
                value = np.frombuffer(raw.to_bytes(width, "little"), dtype=dtype)
            blob = value.tobytes()
            out[at : at + len(blob)] = blob
        elif kind == "string" and layout.strings:
            at, length = rng.choice(layout.strings)
            if length:
                blob = (rng.choice(HOSTILE_STRING_BYTES) * length)[:length]
                out[at : at + length] = blob
        elif kind == "offset" and layout.tensor_offsets:
            i = rng.randrange(len(layout.tensor_offsets))
            at = layout.tensor_offsets[i]
            base = layout.offset_values[i]
            value = rng.choice(
                [base + 1, base + 4, base + 32, max(0, base - 32), rng.choice(layout.offset_values)]
            )
            out[at : at + 8] = value.to_bytes(8, "little")
    return bytes(out)
