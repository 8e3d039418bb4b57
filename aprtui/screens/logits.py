"""The logits screen: do A and B predict the same next token, position by position?

A thin view of an `engine.logits.logit_report` dict (computed by the engine in a worker): the
summary block (`format_logit_report`), KL(A‖B) per position as a heat strip that wraps and bins
at any prompt length (aprtui.widgets.token_strip), and a table of the positions whose top-1
differ, worst KL first, with the input token and both sides' top-5 next tokens as text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from aprtui.coordinates import display_token
from aprtui.widgets.metrics import short_number
from aprtui.widgets.token_strip import strip_text

TABLE_ROWS = 50
"""Disagreeing positions listed (worst KL first); the summary gives the full count."""

KL_FLOOR, KL_CEILING = 1e-6, 1.0
"""The KL strip's colour scale in nats, logarithmic: quantization noise is ~1e-3, a wrong
next token is ~1."""


def kl_score(kl: float) -> float:
    """0 at KL_FLOOR nats or less, 1 at KL_CEILING or more, log-linear between."""
    if not kl > KL_FLOOR:
        return 0.0
    span = math.log10(KL_CEILING / KL_FLOOR)
    return min(1.0, math.log10(kl / KL_FLOOR) / span)


class LogitsScreen(Screen[None]):
    """Per-position logit metrics of a comparison."""

    BINDINGS = [Binding("escape", "app.pop_screen", "back")]

    DEFAULT_CSS = """
    LogitsScreen { layout: vertical; }
    #logits-summary { padding: 0 1; }
    #logits-strip { padding: 1 1 0 1; }
    #logits-table { height: auto; max-height: 60%; margin: 1 1 0 1; }
    """

    def __init__(
        self,
        report: dict[str, Any],
        token_ids: Sequence[int],
        token_text: Callable[[int], str] | None = None,
    ) -> None:
        super().__init__()
        self.report = report
        self.token_ids = list(token_ids)
        self.token_text = token_text

    def _token_name(self, token: int) -> str:
        if self.token_text is None:
            return str(token)
        try:
            return display_token(self.token_text(token))
        except Exception:
            return str(token)

    def compose(self) -> ComposeResult:
        from engine.logits import format_logit_report

        named = self._token_name if self.token_text is not None else None
        lines = format_logit_report(
            self.report, named, listed_elsewhere="the table below, worst KL first"
        )
        with VerticalScroll():
            yield Static(Text("\n".join(lines)), id="logits-summary")
            kl = np.array(
                [math.nan if v is None else v for v in self.report.get("kl_ab", [])], dtype=float
            )
            labels = [self._token_name(t) for t in self.token_ids]
            strip = strip_text(
                kl, cosine=False, threshold=0.0, token_labels=labels, score_fn=kl_score
            )
            title = Text("KL(A‖B) per position (nats)", style="bold")
            yield Static(Text.assemble(title, "\n", strip), id="logits-strip")
            yield DataTable(id="logits-table", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("pos", "input", "KL", "A top-5", "B top-5")
        report = self.report
        kl = report.get("kl_ab", [])
        disagree = sorted(
            report.get("disagreeing_positions", []),
            key=lambda i: -(kl[i] if kl[i] is not None else math.inf),
        )
        for position in disagree[:TABLE_ROWS]:
            value = kl[position]
            table.add_row(
                str(position),
                self._token_name(self.token_ids[position])
                if position < len(self.token_ids)
                else "",
                "NaN" if value is None else short_number(value),
                " ".join(self._token_name(t) for t in report["top_a"][position]),
                " ".join(self._token_name(t) for t in report["top_b"][position]),
            )
        if not disagree:
            table.add_row("", "", "", "every position: same top-1", "")
