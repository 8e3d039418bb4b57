"""Starting a command that a test interrupts part-way (Ctrl+C, SIGINT) once it has shown progress.

Such a test reads the command's progress lines and signals it at, say, layer 2 of 40. On a
loaded machine (a CI runner shared with other jobs, both cores busy) the test process can wait
longer for the CPU than the command needs to finish its remaining layers; the signal then finds
a finished command, which exited 0, and the test fails for no fault of apr-tui's (seen once, in
a suite run beside benchmarks that kept both cores busy: both Ctrl+C tests reported every layer
traced and exit status 0). Started through `interruptible`, the command runs
at a lower priority than the test, so under load it is the command that waits, and the signal
arrives part-way as intended; on an idle machine both run at full speed.
"""

from __future__ import annotations

import os
import signal

CHILD_NICENESS = 10
"""How much lower the command's priority is than the test's (Linux nice values, 0..19)."""


def interruptible() -> None:
    """`preexec_fn` for subprocess.Popen: the child runs CHILD_NICENESS lower than the test,
    with SIGINT's default action (a shell without job control starts background commands with
    SIGINT ignored; pytest restores it for itself, and this makes the child independent of it)."""
    os.nice(CHILD_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
