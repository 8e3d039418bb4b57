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


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = 0 if total <= 0 else min(width, done * width // total)
    return "█" * filled + "░" * (width - filled)


def status_text(status: RunStatus) -> Text:
    """`A x  B y │ 7 tokens │ cpu │ 3.2 s │ ███░░ 120/483 │ first divergence …`."""
    parts: list[Text] = []
    if status.label_a:
        sides = Text.assemble(("A ", "bold"), status.label_a)
        if status.label_b is not None:
            sides.append_text(Text.assemble(("  B ", "bold"), status.label_b))
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
    if status.divergence:
        parts.append(Text(status.divergence, "bold red"))
    return Text(" │ ").join(parts)


class StatusLine(Static):
    """The run's facts; the app calls `set` with the fields that changed."""

    status: RunStatus

    def on_mount(self) -> None:
        self.status = RunStatus()
        self.update(status_text(self.status))

    def set(self, **changes: object) -> None:
        self.status = replace(self.status, **changes)
        # One line whatever it says: repaint without a layout pass (this runs per cell).
        self.update(status_text(self.status), layout=False)
