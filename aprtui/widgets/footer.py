"""The key footer on narrow terminals: one rule for every screen that has one."""

from __future__ import annotations

from textual.widgets import Footer

FOOTER_ROOMY = 130
"""Columns from which the footer spaces its keys out; below, compact spacing."""

FOOTER_PALETTE = 110
"""Columns from which the footer shows the `^p palette` hint; below, it gives its room to the
keys (ctrl+p still works, and the help screen lists it)."""


def fit_footer(footer: Footer, width: int) -> None:
    """Keep every key of `footer` visible on a terminal `width` columns wide."""
    footer.compact = width < FOOTER_ROOMY
    footer.show_command_palette = width >= FOOTER_PALETTE
