"""Printing the headless commands' reports: the terminal's width on a terminal, the content's
own width when piped.

Rich wraps and pads to the console width, which is 80 columns when stdout is not a terminal:
`apr-tui diff DIR DIR > report.txt` came out hard-wrapped mid-path, with every table line
padded with trailing spaces. Piped, a report is measured first and printed at the width it
needs (no line is ever wrapped), and every line's trailing spaces are stripped, so that the
file greps and diffs cleanly.
"""

from __future__ import annotations

import sys
from typing import Any

PIPE_MAX_WIDTH = 1000
"""The widest line a piped report may have before Rich wraps it after all (a path over a
thousand characters); wider than any real table, narrow enough to measure fast."""


def to_terminal() -> bool:
    """Whether stdout is an interactive terminal."""
    return sys.stdout.isatty()


def print_report(*renderables: Any) -> None:
    """Print Rich renderables (Text, Table, Panel, markup strings) to stdout: as Rich would on a
    terminal; piped, at the width each needs, without trailing spaces."""
    from rich.console import Console

    if to_terminal():
        console = Console(highlight=False)
        for renderable in renderables:
            console.print(renderable, soft_wrap=isinstance(renderable, str))
        return
    probe = Console(highlight=False, width=PIPE_MAX_WIDTH, no_color=True)
    out = []
    for renderable in renderables:
        width = probe.measure(renderable).maximum if not isinstance(renderable, str) else None
        console = Console(
            highlight=False,
            width=max(1, min(width, PIPE_MAX_WIDTH)) if width else PIPE_MAX_WIDTH,
            soft_wrap=isinstance(renderable, str),
            no_color=True,
            color_system=None,
        )
        with console.capture() as capture:
            console.print(renderable)
        out.extend(line.rstrip() for line in capture.get().splitlines())
    sys.stdout.write("".join(f"{line}\n" for line in out))


def incomplete_warnings(*sides: tuple[str, Any]) -> list[Any]:
    """A yellow `warning:` line for each (label, TraceDir) whose run did not finish."""
    from rich.text import Text

    lines = []
    for label, trace in sides:
        note = getattr(trace, "incomplete_note", None)
        if note:
            lines.append(Text(f"warning: {label}: {note}", style="bold yellow"))
    return lines
