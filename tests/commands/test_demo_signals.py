"""`apr-tui demo` ended by a signal, in a real pseudo-terminal: SIGTERM (`kill`) or SIGHUP (the
terminal closed) quits the explorer the way `q` does, and its temporary directory goes too."""

from __future__ import annotations

import os
import pty
import select
import signal
import time
from pathlib import Path

import pytest

WAIT_S = 120.0
"""Upper bound of every wait below: a broken test fails instead of hanging."""


def demo_directories(root: Path) -> list[Path]:
    return sorted(root.glob("apr-tui-demo-*"))


@pytest.mark.parametrize(
    ("ending", "status", "drawn"),
    [(signal.SIGTERM, 143, True), (signal.SIGHUP, 129, True), (signal.SIGTERM, 143, False)],
    ids=["SIGTERM", "SIGHUP", "SIGTERM-before-the-screen"],
)
def test_an_ending_signal_quits_the_demo_and_removes_its_directory(
    apr_tui, tmp_path, ending, status, drawn
):
    """`drawn`: the signal comes once the grid is drawn, or as soon as the demo's directory
    exists (the explorer's loop may not run yet)."""
    env = dict(os.environ, TMPDIR=str(tmp_path), TERM="xterm-256color", COLUMNS="100", LINES="30")
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the real command on the pseudo-terminal
        os.execvpe(apr_tui[0], [*apr_tui, "demo", "--small"], env)
    seen = b""
    deadline = time.monotonic() + WAIT_S
    ended = (0, 0)
    try:
        # Keep reading the terminal (a full one would block the app) until the demo's pair is
        # built and the explorer has drawn its grid.
        while not (demo_directories(tmp_path) and (b"layer" in seen or not drawn)):
            assert time.monotonic() < deadline, "the demo did not start"
            if select.select([terminal], [], [], 0.1)[0]:
                seen += os.read(terminal, 65536)
        os.kill(pid, ending)
        while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "the demo did not quit on the signal"
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    seen += os.read(terminal, 65536)
                except OSError:  # the terminal closed with the app
                    time.sleep(0.05)
    finally:
        if ended[0] == 0:  # not reaped: a failed wait above
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(terminal)
    assert os.waitstatus_to_exitcode(ended[1]) == status
    assert demo_directories(tmp_path) == []
