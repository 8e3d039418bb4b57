"""Messages between the engine worker, the widgets and the screens.

The engine worker runs in a thread and only ever talks to the UI through these messages
(`post_message` is thread-safe and does not block the worker); widgets post the selection
messages up to the app ("attributes down, messages up").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from textual.message import Message

from engine.compare import Cell
from engine.plan import Plan


@dataclass
class RunStarted(Message):
    """The plan is made (both sides open, tokens, layers and cells decided); the run starts."""

    plan: Plan
    device: str


@dataclass
class CellReady(Message):
    """One (layer, stage) comparison is done."""

    cell: Cell


@dataclass
class RunProgress(Message):
    """How many cells are done; a newer progress message replaces a queued older one."""

    done: int
    total: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunProgress)


@dataclass
class RunFinished(Message):
    """The comparison ran to its end (or was cancelled)."""

    cells: int
    cancelled: bool = False


@dataclass
class RunFailed(Message):
    """The engine raised: the message is the one-line error, ready to show."""

    error: str


@dataclass
class CellSelected(Message):
    """The user opened a grid cell (Enter, or a click on the cursor cell)."""

    layer: int
    stage: str


@dataclass
class CursorMoved(Message):
    """The grid cursor is on another cell; `cell` is None while that cell has no result."""

    layer: int
    stage: str
    cell: Cell | None


@dataclass
class MetricChanged(Message):
    """The grid shows another metric (the legend follows)."""

    metric: str


@dataclass
class TensorsLoaded(Message):
    """A drill-down's full tensors arrived from its worker (`b` is None without a reference)."""

    a: np.ndarray | None
    b: np.ndarray | None
    error: str | None = None
    details: Any = None
    """The screen's own computed views of the tensors (cell_detail.DetailData)."""


@dataclass
class LogitsProgress(Message):
    """The logit metrics' worker measured `done` of `total` positions (a long prompt's take
    seconds: the status line shows how far they are)."""

    done: int
    total: int


@dataclass
class LogitsReady(Message):
    """The per-position logit metrics of the run (engine.logits), or why there are none."""

    report: dict | None
    error: str | None = None
