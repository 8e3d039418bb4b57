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
from collections.abc import Iterable, Sequence
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


Segment = str | tuple[str, str]
"""Plain text, or (text, Rich style): never parsed as markup, so a path needs no escaping."""

Line = Segment | Sequence[Segment]
"""One line of a report: a segment, or segments printed side by side."""


def _segments(line: Line) -> Sequence[Segment]:
    return [line] if isinstance(line, (str, tuple)) else line


def line_text(line: Line) -> str:
    """The line's characters, without its styles."""
    return "".join(s if isinstance(s, str) else s[0] for s in _segments(line))


def print_lines(lines: Iterable[Line]) -> None:
    """Print report lines of plain text with optional styles (`Segment`): on a terminal
    through Rich, in their styles and soft-wrapped; piped, as plain text without trailing
    spaces, which is what Rich prints there too, without importing or running Rich.

    Piped is how scripts, CI and benchmarks run a command, and there Rich only cost time: its
    import (~30 ms) and a console per line (~20 ms for a trace's report) in a trace that takes
    under a second."""
    if not to_terminal():
        sys.stdout.write("".join(f"{line_text(line).rstrip()}\n" for line in lines))
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    for line in lines:
        console.print(Text.assemble(*_segments(line)), soft_wrap=True)


def table_lines(
    header: Sequence[str], rows: Sequence[Sequence[Segment]], min_widths: Sequence[int] = ()
) -> list[Line]:
    """A table as report lines: a bold header row, then the rows; every column right-justified
    to its widest cell (at least `min_widths[i]` for column i), columns two spaces apart.

    The layout of a Rich `Table(box=None, pad_edge=False, padding=(0, 1))` whose columns are
    right-justified and never wrap, as `apr-tui bisect` printed it through Rich (the test
    renders both), without Rich's layout pass: ~0.1 s for a 31 × 20 grid. A cell's width is
    its length in characters: the cells are numbers and ASCII labels, plus one-cell marks
    such as ◆ and ·."""
    columns = len(header)
    widths = [
        max(min_widths[i] if i < len(min_widths) else 0, len(header[i])) for i in range(columns)
    ]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(line_text(cell)))
    lines: list[Line] = []
    for row, style in [(list(header), "bold")] + [(list(row), "") for row in rows]:
        segments: list[Segment] = []
        for i, cell in enumerate(row):
            text, cell_style = (cell, style) if isinstance(cell, str) else cell
            segments.append(" " * (widths[i] - len(text) + (2 if i else 0)))
            segments.append((text, cell_style) if cell_style else text)
        lines.append(segments)
    return lines


def incomplete_warnings(*sides: tuple[str, Any]) -> list[Any]:
    """A yellow `warning:` line for each (label, TraceDir) whose run did not finish."""
    from rich.text import Text

    lines = []
    for label, trace in sides:
        note = getattr(trace, "incomplete_note", None)
        if note:
            lines.append(Text(f"warning: {label}: {note}", style="bold yellow"))
    return lines
