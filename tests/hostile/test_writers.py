"""Writers under concurrency, kills and a full disk (issue 11, "writers"): a file that appears at
an output path is never replaced without --force, one run owns a trace directory, a killed run
leaves no temporary behind for long, long names work, and a full disk names the file and leaves
nothing half-made."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from aprtui import cli
from engine.aprt import read_aprt, write_aprt
from engine.fileio import (
    TEMP_NAME,
    OutputExistsError,
    atomic_output,
    locked_directory,
    remove_stale_temporaries,
)
from engine.formats import apr
from engine.trace_directory import read_trace_dir
from tests.hostile.conftest import one_line_error, run_cli
from tests.support.signals import interruptible

WAIT = 60.0
"""Upper bound of every poll below: a broken test fails instead of hanging."""


def temporaries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if TEMP_NAME.fullmatch(p.name))


def wait_for(condition, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.communicate()}")
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A model whose conversion takes long enough (~1 s) to be caught mid-write."""
    from engine.synth import synthesize

    root = tmp_path_factory.mktemp("big")
    model = synthesize(
        "llama",
        seed=2,
        hidden_size=256,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=1024,
        vocab_size=16000,
    )
    return Path(apr.write(model, root / "big.apr", "f32"))


# ----------------------------------------------------------------------------- no clobber


def test_a_file_appearing_at_convert_out_mid_write_is_not_replaced(files, tmp_path):
    """The overwrite check was check-then-rename: whatever appeared at OUT while the model was
    written was replaced. The publication is now a hard link that fails if OUT exists."""
    from engine.formats import open_model

    target = tmp_path / "out.apr"

    def appear(done, total, name):
        if done == 3:
            target.write_bytes(b"the user's own file")

    with open_model(files.apr) as model, pytest.raises(OutputExistsError, match="appeared while"):
        apr.write(model, target, "f32", progress=appear, overwrite=False)
    assert target.read_bytes() == b"the user's own file"
    assert temporaries(tmp_path) == []


def test_a_file_appearing_at_a_stage_path_mid_trace_is_not_replaced(
    files, tmp_path, monkeypatch, capsys
):
    """A stage file created by another process during `trace` was replaced without --force."""
    import engine.forward

    out = tmp_path / "out"
    foreign = out / "layer-1" / "attn_norm.bin"
    real_trace = engine.forward.trace

    def trace_with_intruder(*args, **kwargs):
        for capture in real_trace(*args, **kwargs):
            if capture.layer == 1 and not foreign.exists():
                foreign.parent.mkdir(parents=True, exist_ok=True)
                write_aprt(foreign, 1, np.full(7, 42.0, dtype=np.float32))
            yield capture

    monkeypatch.setattr(engine.forward, "trace", trace_with_intruder)
    code = cli.main(
        [
            "trace",
            str(files.apr),
            "--save-tensor",
            "attn_norm",
            "--save-tensor-layers",
            "0..2",
            "--tokens",
            "1,2,3",
            "--save-tensor-dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    # (progress lines "tracing m.apr: layer N/2" come first on a non-terminal stderr)
    assert [line for line in err.splitlines() if not line.startswith("tracing ")] == [
        f"apr-tui: error: {foreign}: appeared while apr-tui was writing it (another process "
        "created it); not replaced, pass --force to replace it"
    ]
    assert read_aprt(foreign).values.tolist() == [42.0] * 7
    # The directory was new, so the failed run took back what it wrote; the intruder stays.
    assert sorted(p for p in out.rglob("*") if p.is_file()) == [foreign]


def test_two_concurrent_converts_to_one_new_out_exactly_one_wins(apr_tui, big, tmp_path):
    """Both used to exit 0, the second silently replacing the first's file."""
    out = tmp_path / "out.apr"
    runs = [
        subprocess.Popen(
            [*apr_tui, "convert", str(big), str(out), "--dtype", "f16"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(run.wait(timeout=WAIT), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2, 2], results
    for code, _, err in results:
        if code == 2:
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert str(out) in err and ("already exists" in err or "appeared while" in err), err
    apr.verify_footer(out)
    assert temporaries(tmp_path) == []


def test_trace_refuses_a_directory_another_run_is_writing(apr_tui, files, tmp_path):
    """Two traces with different tokens into one directory could both succeed, leaving one
    prompt's stage files under the other's tokens.json. The directory is now locked."""
    out = tmp_path / "out"
    out.mkdir()
    with locked_directory(out):
        result = run_cli(
            apr_tui,
            "trace",
            files.apr,
            "--save-tensor",
            "attn_norm",
            "--tokens",
            "1,2",
            "--save-tensor-dir",
            out,
            text=True,
        )
    one_line_error(result, str(out), "another apr-tui run is writing into this directory")
    assert list(out.iterdir()) == []


def test_concurrent_traces_leave_files_that_match_tokens_json(apr_tui, files, tmp_path):
    out = tmp_path / "out"
    token_lists = ["1,2", "3,4,5", "6,7,8,9"]
    runs = [
        subprocess.Popen(
            [
                *apr_tui,
                "trace",
                str(files.apr),
                "--save-tensor",
                "all",
                "--save-tensor-layers",
                "0..2",
                "--tokens",
                tokens,
                "--save-tensor-dir",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tokens in token_lists
    ]
    results = [(run.wait(timeout=WAIT), *run.communicate()) for run in runs]
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results  # different tokens: the losers are refused
    for code, _, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
    trace = read_trace_dir(out)
    assert trace.complete is True
    seq = len(token_lists[winners[0]].split(","))
    assert trace.token_ids == [int(t) for t in token_lists[winners[0]].split(",")]
    for (layer, stage), path in trace.entries.items():
        if stage in ("attn_norm", "post_ffn_residual", "final_norm"):
            assert read_aprt(path).values.size == seq * 64, (layer, stage)


# ----------------------------------------------------------------------------- kills


@pytest.mark.parametrize(
    ("ending", "status", "said"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
    ids=["SIGTERM", "SIGHUP"],
)
def test_an_ending_signal_during_convert_removes_the_temporary(
    apr_tui, big, tmp_path, ending, status, said
):
    """`kill` or a closed terminal (SIGHUP) mid-write: the hidden temporary goes too."""
    out = tmp_path / "out.apr"
    run = subprocess.Popen(
        [*apr_tui, "convert", str(big), str(out), "--dtype", "q4_k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: temporaries(tmp_path), "the temporary", run)
    run.send_signal(ending)
    code = run.wait(timeout=WAIT)
    _, err = run.communicate()
    assert code == status, err
    assert err.splitlines()[-1] == f"apr-tui: {said}", err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_sigkilled_converts_temporary_is_removed_by_the_next_run(apr_tui, big, tmp_path):
    out = tmp_path / "out.apr"
    run = subprocess.Popen(
        [*apr_tui, "convert", str(big), str(out), "--dtype", "q4_k"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    [stale] = wait_for(lambda: temporaries(tmp_path), "the temporary", run)
    run.kill()
    run.wait(timeout=WAIT)
    assert stale.exists() and not out.exists()  # what a SIGKILL leaves
    again = run_cli(apr_tui, "convert", big, out, text=True)
    assert again.returncode == 0, again.stderr
    assert sorted(tmp_path.iterdir()) == [out]
    apr.verify_footer(out)


def test_stale_temporary_removal_spares_live_writers_and_other_files(tmp_path):
    """Only a temporary of ours whose writer is gone (nobody holds its lock) is removed."""
    import fcntl

    dead = tmp_path / ".apr-tui.999999.0badc0de.tmp"
    live = tmp_path / ".apr-tui.999998.0badc0df.tmp"
    other = tmp_path / ".notes.999997.0badc0de.tmp"  # an older pattern: not provably stale
    for path in (dead, live, other):
        path.write_bytes(b"x")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert remove_stale_temporaries(tmp_path) == [dead]
        assert live.exists() and other.exists() and not dead.exists()
    finally:
        os.close(fd)


def test_sigterm_during_trace_leaves_whole_files_marked_incomplete(apr_tui, big, tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen(
        [
            *apr_tui,
            "trace",
            str(big),
            "--save-tensor",
            "all",
            "--save-tensor-layers",
            "0..8",
            "--tokens",
            ",".join(["5"] * 40),
            "--save-tensor-dir",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: list(out.glob("layer-1/*.bin")), "layer 1's first stage file", run)
    run.send_signal(signal.SIGTERM)
    code = run.wait(timeout=WAIT)
    _, err = run.communicate()
    assert code == 143, err
    assert "Traceback" not in err
    assert temporaries(out) == []
    trace = read_trace_dir(out)  # strict: every stage file present is whole
    assert trace.complete is False
    assert (7, "post_ffn_residual") not in trace.entries


def test_sigint_during_trace_marks_the_directory_incomplete(apr_tui, big, tmp_path):
    """Issue 10 item 10: Ctrl+C left layers 0-6 and a tokens.json that later commands took for
    a complete reference."""
    out = tmp_path / "out"
    run = subprocess.Popen(
        [
            *apr_tui,
            "trace",
            str(big),
            "--save-tensor",
            "all",
            "--save-tensor-layers",
            "0..8",
            "--tokens",
            ",".join(["5"] * 40),
            "--save-tensor-dir",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    wait_for(lambda: list(out.glob("layer-1/*.bin")), "layer 1's first stage file", run)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=WAIT) == 130
    assert read_trace_dir(out).complete is False
    rerun = run_cli(
        apr_tui,
        "trace",
        big,
        "--save-tensor",
        "attn_norm",
        "--tokens",
        ",".join(["5"] * 40),
        "--save-tensor-dir",
        out,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert read_trace_dir(out).complete is True


def test_a_sigkilled_trace_reruns_to_a_complete_directory(apr_tui, big, tmp_path):
    out = tmp_path / "out"
    argv = [
        *apr_tui,
        "trace",
        str(big),
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "0..8",
        "--tokens",
        ",".join(["5"] * 40),
        "--save-tensor-dir",
        str(out),
    ]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: list(out.glob("layer-1/*.bin")), "layer 1's first stage file", run)
    run.kill()
    run.wait(timeout=WAIT)
    assert read_trace_dir(out).complete is False
    again = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT)
    assert again.returncode == 0, again.stderr
    trace = read_trace_dir(out)
    assert trace.complete is True and (7, "post_ffn_residual") in trace.entries
    assert temporaries(out) == []


# ----------------------------------------------------------------------------- names, disks


def test_an_output_name_near_name_max_works(apr_tui, files, tmp_path):
    """The temporary was `.<name>.<pid>.<hex>.tmp`: over NAME_MAX for names over ~233 bytes."""
    out = tmp_path / ("m" * 251 + ".apr")  # 255 bytes
    result = run_cli(apr_tui, "convert", files.apr, out, text=True)
    assert result.returncode == 0, result.stderr
    apr.verify_footer(out)
    with atomic_output(tmp_path / ("s" * 255)) as temp:
        temp.write_bytes(b"ok")
    assert (tmp_path / ("s" * 255)).read_bytes() == b"ok"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, where the machine lets us mount one (root, no sandbox forbidding it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip() or made.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


def test_convert_on_a_full_disk_names_the_file_and_leaves_nothing(apr_tui, big, small_disk):
    """Was: "no space left on device" without a path, and the temporary left behind."""
    out = small_disk / "out.apr"
    result = run_cli(apr_tui, "convert", big, out, text=True)
    one_line_error(result, f"{out}: no space left on device")
    assert list(small_disk.iterdir()) == []


def test_trace_too_big_for_the_disk_is_refused_up_front(apr_tui, big, small_disk):
    """Was: "10752 requested and 4093 written" (numpy's tofile) and an empty directory left.
    Now the run's size is known before it starts (issue 13): refused, nothing written."""
    out = small_disk / "new" / "trace"
    result = run_cli(
        apr_tui,
        "trace",
        big,
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "0..8",
        "--tokens",
        ",".join(["5"] * 40),
        "--save-tensor-dir",
        out,
        text=True,
    )
    line = one_line_error(result, f"--save-tensor-dir {out}: the run writes", "MiB free")
    assert line.startswith("apr-tui: error: ")
    assert list(small_disk.iterdir()) == []


def test_a_stage_file_on_a_full_disk_names_the_file_and_leaves_nothing(small_disk):
    """The writer under trace, when the disk fills after the up-front check (another process
    filled it): ENOSPC naming the stage file, never the temporary, and no temporary left."""
    import errno

    from engine.aprt import write_stage

    directory = small_disk / "trace"
    with pytest.raises(OSError) as raised:
        write_stage(directory, "attn_norm", 0, np.zeros(200_000, dtype=np.float32))  # 800 KB
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(directory / "layer-0" / "attn_norm.bin")
    assert [p.name for p in directory.rglob("*") if p.is_file()] == []
