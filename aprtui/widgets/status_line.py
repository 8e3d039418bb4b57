"""One line of run facts: the models, token count, device, elapsed time and progress."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.text import Text
from textual.widgets import Static

BAR_WIDTH = 16


@dataclass(frozen=True)
class RunStatus:
    label_a: str = ""
    label_b: str | None = None
    tokens: int | None = None
    device: str = ""
    elapsed: float | None = None
    """Seconds since the run started; None hides the clock (tests, snapshots)."""
    done: int = 0
    total: int = 0
    state: str = "starting"
    """`starting`, `running`, `finished`, `cancelled` or `failed`."""
    divergence: str | None = None
    note: str | None = None
    """Shown while starting (what is being prepared)."""
    task: str | None = None
    """Work running after the grid (the logit metrics): what and how far, or None."""


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = 0 if total <= 0 else min(width, done * width // total)
    return "█" * filled + "░" * (width - filled)


SEPARATOR = " │ "


def status_text(status: RunStatus, width: int | None = None) -> Text:
    """`A x  B y │ 7 tokens │ cpu │ 3.2 s │ ███░░ 120/483 │ first divergence …`.

    With a `width`, the parts are packed greedily onto as many lines as they need (a narrow
    terminal gets the first divergence on a second line instead of losing it off the edge).
    """
    parts: list[Text] = []
    if status.label_a:
        sides = Text.assemble(("A ", "bold"), status.label_a)
        if status.label_b is not None:
            sides.append_text(Text.assemble(("  B ", "bold"), status.label_b))
        else:  # the header that says so is hidden in the compact layout: the status line says it
            sides.append(" (single model: std of A)", "dim")
        parts.append(sides)
    if status.tokens is not None:
        parts.append(Text(f"{status.tokens} tokens"))
    if status.device:
        parts.append(Text(status.device))
    if status.elapsed is not None:
        parts.append(Text(f"{status.elapsed:.1f} s"))
    if status.state == "running":
        parts.append(
            Text.assemble(
                (progress_bar(status.done, status.total), "cyan"), f" {status.done}/{status.total}"
            )
        )
    elif status.state == "finished":
        parts.append(Text(f"done: {status.done} cells", "green"))
    elif status.state == "starting" and status.note:
        parts.append(Text(status.note, "yellow"))
    else:
        parts.append(Text(status.state, "bold red" if status.state == "failed" else "yellow"))
    if status.task:
        parts.append(Text(status.task, "cyan"))
    if status.divergence:
        agrees = status.divergence.startswith("no origin")
        parts.append(Text(status.divergence, "bold green" if agrees else "bold red"))
    if width is None:
        return Text(SEPARATOR).join(parts)
    lines: list[list[Text]] = [[]]
    used = 0
    for part in parts:
        needed = part.cell_len + (len(SEPARATOR) if lines[-1] else 0)
        if lines[-1] and used + needed > width:
            lines.append([])
            used, needed = 0, part.cell_len
        lines[-1].append(part)
        used += needed
    return Text("\n").join(Text(SEPARATOR).join(line) for line in lines)


class StatusLine(Static):
    """The run's facts; the app calls `set` with the fields that changed.

    Usually one line; when the terminal is too narrow for every part, the parts wrap onto a
    second (or third) line, so nothing is cut off.
    """

    status: RunStatus

    def on_mount(self) -> None:
        self.status = RunStatus()
        self._line_count = 1
        self._show()

    def on_resize(self) -> None:
        self._show()

    def set(self, **changes: object) -> None:
        self.status = replace(self.status, **changes)
        self._show()

    def _show(self) -> None:
        width = self.content_size.width or None
        text = status_text(self.status, width)
        # Lines as drawn: a part longer than the width (a long verdict) wraps on its own.
        lines = len(text.wrap(self.app.console, width)) if width else text.plain.count("\n") + 1
        # Repaint without a layout pass unless the line count changed (this runs per cell).
        self.update(text, layout=lines != self._line_count)
        self._line_count = lines
