"""Progress of the engine's long steps on stderr (aprtui.step_progress, engine.progress): quiet
for a short step, a line every few seconds when piped, one line rewritten on a terminal, and
the real command showing a big APR file's footer check for both sides of a bisect."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from aprtui.step_progress import EVERY_SECONDS, QUIET_SECONDS, StepProgress

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_step_that_ends_within_the_quiet_time_prints_nothing():
    clock, stream = Clock(), io.StringIO()
    progress = StepProgress(stream, clock)
    progress("checking m.apr", 0, 10 * MIB)
    clock.now += QUIET_SECONDS / 2
    progress("checking m.apr", 5 * MIB, 10 * MIB)
    progress("checking m.apr", 10 * MIB, 10 * MIB)
    assert stream.getvalue() == ""


def test_piped_a_line_every_few_seconds_and_one_with_the_total_at_the_end():
    clock, stream = Clock(), io.StringIO()
    progress = StepProgress(stream, clock)
    total = 4 << 30
    progress("checking big.apr", 0, total)
    for step in range(1, 12):  # a report every second
        clock.now += 1.0
        progress("checking big.apr", total * step // 12, total)
    clock.now += 0.5
    progress("checking big.apr", total, total)
    lines = stream.getvalue().splitlines()
    # shown from QUIET_SECONDS on, then every EVERY_SECONDS: at 1 s, 6 s and 11 s
    assert len(lines) == 1 + int((11 - QUIET_SECONDS) // EVERY_SECONDS) + 1
    assert lines[0] == "apr-tui: checking big.apr: 0.3 of 4.0 GiB (8%)"
    assert lines[-1] == "apr-tui: checking big.apr: 4.0 GiB in 11.5 s"


def test_on_a_terminal_one_line_is_rewritten_and_erased_at_the_end():
    clock, stream = Clock(), Terminal()
    progress = StepProgress(stream, clock)
    progress("checking big.apr", 0, 100 * MIB)
    for done in (40, 80):
        clock.now += 1.0
        progress("checking big.apr", done * MIB, 100 * MIB)
    progress("checking big.apr", 100 * MIB, 100 * MIB)
    text = stream.getvalue()
    assert "\n" not in text
    assert text.count("\r") == 4  # two updates, then erased
    assert "40.0 of 100.0 MiB (40%)" in text and "80.0 of 100.0 MiB (80%)" in text
    assert text.endswith(
        "\r" + " " * len("apr-tui: checking big.apr: 80.0 of 100.0 MiB (80%)") + "\r"
    )


PATCHED_MAIN = """
import sys
import aprtui.step_progress as step_progress
import engine.formats.apr.layout as layout
step_progress.QUIET_SECONDS = 0.0  # every report shown: the test files are small
step_progress.EVERY_SECONDS = 0.0
layout.PARALLEL_CRC_BYTES = 1024  # the test files checked in parts, as a 7B file is
layout.CRC_PART_BYTES = 1000
from aprtui.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bisect_shows_both_files_footer_checks_on_stderr(models, tmp_path):
    """The real command line: the listener reaches the engine on the main thread and on the
    helper that opens B (engine.sources.opening.open_two_models), and stdout stays JSON."""
    from engine.formats import apr, open_model

    copy = tmp_path / "copy.apr"
    with open_model(models.apr) as model:
        apr.write(model, copy, "q8_0")
    result = subprocess.run(
        [sys.executable, "-c", PATCHED_MAIN, "bisect", str(models.apr), str(copy), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr
    json.loads(result.stdout)  # progress never mixes into the report
    progress = [line for line in result.stderr.splitlines() if ": checking " in line]
    for name in ("m.apr", "copy.apr"):
        lines = [line for line in progress if line.startswith(f"apr-tui: checking {name}: ")]
        assert len(lines) >= 2, result.stderr
        assert lines[-1].endswith(" s")  # the closing line with the time taken


def test_convert_quiet_shows_no_progress(models, tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-c", PATCHED_MAIN, "convert", str(models.apr),
            str(tmp_path / "out.apr"), "--dtype", "q8_0", "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "checking" not in result.stderr
