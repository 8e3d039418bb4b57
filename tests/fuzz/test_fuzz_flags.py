"""Seeded hostile values for every flag grammar: each command run in-process through
`aprtui.cli.main` (CASES per flag), a sample through the real `apr-tui`. Exactly one flag is
hostile per case, so the one error line must name that flag (or the model file, for an id
outside the vocabulary)."""

from __future__ import annotations

import argparse
import math
import os
import random

import pytest

from aprtui import cli
from aprtui.commands.options import cosine_threshold, parse_layers
from engine.errors import AprTuiError
from engine.stages import STAGES
from tests.fuzz.conftest import (
    CASES,
    HOSTILE_TEXT,
    SUBPROCESS_CASES,
    CliResult,
    assert_cli_contract,
    bounded,
    rng_for,
    run_apr_tui,
)

NUMBERS = [
    "0",
    "1",
    "+1",
    " 2",
    "-1",
    "4294967295",
    "4294967296",
    "9" * 5000,
    "0" * 400 + "1",
    "\u0663",
    "1.5",
    "",
    "0x1",
    "\u00b2",
    "1e3",
    "nan",
    "inf",
    "-0",
    "1_0",
    "2\n",
]
SEPARATORS = ["..", "...", ".", " .. ", "..\n", ",", "..."]


def hostile_number(rng: random.Random) -> str:
    return rng.choice(NUMBERS + HOSTILE_TEXT)


def hostile_range(rng: random.Random) -> str:
    return hostile_number(rng) + rng.choice(SEPARATORS) + hostile_number(rng)


def hostile_tokens(rng: random.Random) -> str:
    return ",".join(hostile_number(rng) for _ in range(rng.randint(1, 4)))


def hostile_stages(rng: random.Random) -> str:
    names = [s.name for s in STAGES] + ["ALL", "all", "layer_output", "Attn_Norm", "", " "]
    words = [rng.choice(names + HOSTILE_TEXT) for _ in range(rng.randint(1, 4))]
    return rng.choice([",", ", ", ",,", ";"]).join(words)


def hostile_text(rng: random.Random) -> str:
    # No 5000-character piece: a prompt of thousands of tokens is issue 13's (attention memory
    # grows with seq^2 there), not a grammar case.
    pieces = [t for t in HOSTILE_TEXT if len(t) < 100]
    pieces += ["What is 2+2?", "\u2581", "<s>", "<|endoftext|>", "\t" * 50]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))


def hostile_float(rng: random.Random) -> str:
    return rng.choice(
        [
            "2\n",
            "nan",
            "inf",
            "-inf",
            "1e999",
            "0.9",
            "--1",
            "",
            "1_0",
            "\u0660.\u0669",
            "0.999",
            "-1",
            "1",
            "1.0000001",
            *HOSTILE_TEXT,
        ]
    )


# (flag, generator, commands it belongs to)
FLAGS = {
    "--save-tensor": hostile_stages,
    "--save-tensor-layers": hostile_range,
    "--tokens": hostile_tokens,
    "--prompt": hostile_text,
    "--threshold": hostile_float,
    "--layers": hostile_range,
    "--dtype": hostile_text,
    "--limit": hostile_number,
    "--device": hostile_text,
}

# What the error line says for each flag (apr's wording for the save-tensor grammar).
NAMED = {
    "--save-tensor": "save-tensor stage list invalid",
    "--save-tensor-layers": "save-tensor layer range invalid",
}


def argv_for(flag: str, value: str, files, out) -> tuple[list[str], tuple[int, ...]]:
    """A command line with `value` for `flag` and valid everything else; the ok exit codes."""
    model, other = str(files["apr"]), str(files["gguf"])
    if flag in ("--save-tensor", "--save-tensor-layers", "--tokens", "--prompt"):
        argv = ["trace", model, "--save-tensor", "attn_norm", "--save-tensor-dir", str(out)]
        if flag == "--save-tensor":
            argv[3] = value
        else:
            argv += [flag, value]
        if flag not in ("--tokens", "--prompt"):
            argv += ["--tokens", "1,2"]
        return argv, (0,)
    if flag in ("--threshold", "--layers"):
        return ["bisect", model, other, "--tokens", "1,2", flag, value], (0, 1)
    if flag == "--dtype":
        return ["convert", model, str(out) + ".apr", "--dtype", value], (0,)
    if flag == "--limit":
        return ["diff", str(files["a"]), str(files["b"]), "--limit", value], (0,)
    return ["bisect", model, other, "--tokens", "1,2", "--device", value], (0, 1)


@pytest.fixture(scope="module")
def files(originals, tmp_path_factory):
    from engine.aprt import write_aprt
    from engine.formats import gguf, open_model

    root = tmp_path_factory.mktemp("flag-files")
    with open_model(originals.apr_path) as model:
        other = gguf.write(model, root / "m.gguf")
    return {
        "apr": originals.apr_path,
        "gguf": other,
        "a": write_aprt(root / "a.bin", 0, [1.0, 2.0, 3.0]),
        "b": write_aprt(root / "b.bin", 0, [1.0, 2.5, 3.0]),
    }


def run_in_process(argv: list[str], capsys) -> CliResult:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's usage errors end the process, as they should
        code = exit_.code
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err, 0)


@pytest.mark.parametrize("flag", list(FLAGS))
def test_flag_grammars_in_process(flag, files, tmp_path, capsys):
    rng = rng_for(f"flag{flag}")
    for case in range(CASES):
        value = FLAGS[flag](rng)
        argv, ok = argv_for(flag, value, files, tmp_path / f"out{case}")
        label = f"{flag} case {case}: {value[:60]!r}"
        with bounded(label):
            result = run_in_process(argv, capsys)
        assert_cli_contract(label, result, flag, NAMED.get(flag, flag), str(files["apr"]), ok=ok)


def test_explorer_only_grammars_in_process():
    """--layers and --threshold of the explorer: parsed before any screen opens."""
    rng = rng_for("explorer")
    for case in range(CASES):
        text = hostile_range(rng)
        try:
            layers = parse_layers(text)
        except AprTuiError as error:
            assert "--layers" in str(error) and "\n" not in str(error), (case, str(error))
        else:  # accepted: a real, non-empty range of layers
            assert layers is None or (0 <= layers.start < layers.stop), (case, text, layers)
        value = hostile_float(rng)
        try:
            threshold = cosine_threshold(value)
        except argparse.ArgumentTypeError as error:
            assert str(error), case
        else:  # accepted: a cosine
            assert math.isfinite(threshold) and -1.0 <= threshold <= 1.0, (case, value)


def test_flag_grammars_through_apr_tui(apr_tui, files, tmp_path):
    """A sample of the same cases through the real command, plus a non-UTF-8 byte in a flag
    value (which only a real command line can carry)."""
    rng = rng_for("flags-cli")
    flags = list(FLAGS)
    for case in range(SUBPROCESS_CASES * 6):
        flag = rng.choice(flags)
        value = FLAGS[flag](rng)
        argv, ok = argv_for(flag, value, files, tmp_path / f"out{case}")
        # exec cannot carry a NUL byte: no real command line holds one
        encoded = [os.fsencode(arg).replace(b"\0", b"?") for arg in argv]
        if rng.random() < 0.5:  # a byte that is not UTF-8 in the hostile value
            at = argv.index(value) if value in argv else 3
            encoded[at] = encoded[at] + b"\xff"
        label = f"cli {flag} case {case}: {value[:60]!r}"
        result = run_apr_tui(apr_tui, encoded)
        assert_cli_contract(label, result, flag, NAMED.get(flag, flag), str(files["apr"]), ok=ok)
