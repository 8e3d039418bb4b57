"""`apr-tui trace` writes its stage files inline for a run of small files and on a background
thread for big ones (aprtui.commands.trace_writer.THREAD_MIN_FILE_BYTES); both ways give the
same files, every one recorded, and a failed write still ends the run with a one-line error."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from aprtui import cli
from aprtui.commands import trace_writer
from engine.aprt import read_aprt


def _trace(model: Path, out: Path) -> int:
    argv = ["trace", str(model), "--save-tensor", "all", "--save-tensor-dir", str(out)]
    return cli.main([*argv, "--tokens", "3,1,4,1,5,9"])


def _writing_threads(monkeypatch) -> set[int]:
    """The threads that run the stage-file writes of the next trace."""
    threads: set[int] = set()
    real = trace_writer._write

    def write(*args):
        threads.add(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(trace_writer, "_write", write)
    return threads


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_both_ways_write_the_same_files(models, tmp_path, monkeypatch, capsys, threaded):
    reference = tmp_path / "reference"
    assert _trace(models.apr, reference) == 0  # this model's files are small: inline
    # A threshold of 0 makes every run big enough for the thread; an unreachable one, none.
    monkeypatch.setattr(trace_writer, "THREAD_MIN_FILE_BYTES", 0 if threaded else 1 << 60)
    threads = _writing_threads(monkeypatch)
    out = tmp_path / "out"
    assert _trace(models.apr, out) == 0
    capsys.readouterr()
    assert (threading.get_ident() in threads) is not threaded
    assert len(threads) == 1
    files = sorted(p.relative_to(out) for p in out.rglob("*.bin"))
    assert files and files == sorted(p.relative_to(reference) for p in reference.rglob("*.bin"))
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes()
        read_aprt(out / name)  # whole and readable


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_a_failed_write_is_one_error_and_leaves_no_partial_directory(
    models, tmp_path, monkeypatch, capsys, threaded
):
    monkeypatch.setattr(trace_writer, "THREAD_MIN_FILE_BYTES", 0 if threaded else 1 << 60)
    real, calls = trace_writer._write, []

    def failing(directory, path, capture, overwrite):
        calls.append(capture.stage)
        if len(calls) == 5:
            raise OSError(28, "No space left on device", str(path))
        return real(directory, path, capture, overwrite)

    monkeypatch.setattr(trace_writer, "_write", failing)
    out = tmp_path / "out"
    assert _trace(models.apr, out) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("apr-tui: error:") and "no space left" in error[-1]
    assert not list(out.rglob("*.bin"))  # the files written before the failure were taken back
