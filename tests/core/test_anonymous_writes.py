"""`engine.fileio.atomic_file` through an unnamed temporary (O_TMPFILE, linked to its name when
complete) and its fallbacks: nothing is ever visible half-written, an existing file is never
replaced unless asked, and where the file system says no, the named temporary takes over."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

from engine import fileio
from engine.fileio import TEMP_NAME, OutputExistsError, atomic_file

pytestmark = pytest.mark.skipif(
    not hasattr(os, "O_TMPFILE") or fileio._proc_fd() < 0, reason="needs O_TMPFILE and /proc"
)


def names(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_nothing_is_visible_until_the_file_is_whole(tmp_path):
    target = tmp_path / "stage.bin"
    with atomic_file(target, overwrite=False) as handle:
        handle.write(b"first half ")
        assert names(tmp_path) == []  # no temporary name, no partial target
        handle.write(b"second half")
    assert names(tmp_path) == ["stage.bin"]
    assert target.read_bytes() == b"first half second half"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_file_appearing_at_the_target_is_never_replaced(tmp_path):
    target = tmp_path / "stage.bin"
    appeared = pytest.raises(OutputExistsError, match="appeared while apr-tui was writing it")
    with appeared, atomic_file(target, overwrite=False) as handle:
        handle.write(b"ours")
        target.write_bytes(b"theirs")  # another process, mid-write
    assert target.read_bytes() == b"theirs"
    assert names(tmp_path) == ["stage.bin"]


def test_replacing_when_allowed_leaves_no_temporary(tmp_path):
    target = tmp_path / "stage.bin"
    target.write_bytes(b"old")
    with atomic_file(target, overwrite=True) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["stage.bin"]


def test_a_failed_write_leaves_nothing_and_names_the_target(tmp_path):
    target = tmp_path / "stage.bin"
    with pytest.raises(OSError) as raised, atomic_file(target, overwrite=False) as handle:
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == str(target)
    assert names(tmp_path) == []


def test_without_o_tmpfile_a_named_temporary_takes_over(tmp_path, monkeypatch):
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "open", no_tmpfile)
    monkeypatch.setattr(fileio, "_NO_ANONYMOUS", set())
    target = tmp_path / "stage.bin"
    with atomic_file(target, overwrite=False) as handle:
        handle.write(b"named")
        seen = names(tmp_path)
    assert len(seen) == 1 and TEMP_NAME.fullmatch(seen[0])  # the named temporary's way
    assert target.read_bytes() == b"named"
    assert names(tmp_path) == ["stage.bin"]
    assert str(tmp_path) in fileio._NO_ANONYMOUS  # not tried again in this directory


def test_without_a_link_from_proc_the_content_is_copied_out(tmp_path, monkeypatch):
    def no_link(fd, name):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(fileio, "_link_anonymous", no_link)
    monkeypatch.setattr(fileio, "_NO_ANONYMOUS", set())
    target = tmp_path / "stage.bin"
    payload = bytes(range(256)) * 4096  # 1 MiB: more than one sendfile may move
    with atomic_file(target, overwrite=False) as handle:
        handle.write(payload)
    assert target.read_bytes() == payload
    assert names(tmp_path) == ["stage.bin"]
    assert str(tmp_path) in fileio._NO_ANONYMOUS


def test_a_forked_child_names_its_own_files(tmp_path):
    """The /proc/self/fd descriptor is the parent's after a fork; the child reopens its own."""
    fileio._proc_fd()  # opened in this process first
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's cleanup
        code = 0
        try:
            with atomic_file(tmp_path / "child.bin", overwrite=False) as handle:
                handle.write(b"from the child")
        except BaseException:
            code = 1
        os._exit(code)
    deadline = time.monotonic() + 30  # a hung child fails the test instead of hanging it
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish its write within 30 s")
        time.sleep(0.005)
    assert os.waitstatus_to_exitcode(ended[1]) == 0
    assert (tmp_path / "child.bin").read_bytes() == b"from the child"


def test_a_temporary_that_could_not_be_created_is_reported_as_the_target():
    """Was: `convert IN /read-only/out.apr` said `/read-only/.apr-tui.<pid>.<hex>.tmp:
    read-only file system`, naming a file the user never asked for."""
    refused = OSError(errno.EROFS, "Read-only file system", "/ro/.apr-tui.123.0a1b2c3d.tmp")
    named = fileio._naming(refused, "/ro/out.apr", None)
    assert (named.filename, named.errno) == ("/ro/out.apr", errno.EROFS)
    here = OSError(errno.EROFS, "Read-only file system", "./.apr-tui.123.0a1b2c3d.tmp")
    assert fileio._naming(here, "out.apr", None).filename == "out.apr"  # a bare target name
    elsewhere = OSError(errno.EROFS, "Read-only file system", "/other/.apr-tui.123.0a1b2c3d.tmp")
    assert fileio._naming(elsewhere, "/ro/out.apr", None) is elsewhere  # not beside the target
    reading = OSError(errno.EIO, "Input/output error", "/models/in.gguf")
    assert fileio._naming(reading, "/ro/out.apr", None) is reading  # about the input
