"""Per-token agreement: one cosine per token row, as a coloured strip with the values."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.widgets import Static

from aprtui.widgets.metrics import cosine_score, cosine_text, short_number, std_score
from aprtui.widgets.palette import heat_styles, score_index


def per_token_rows(values: np.ndarray, shape: tuple[int, ...], n_tokens: int) -> np.ndarray | None:
    """`values` as [n_tokens, -1] rows, one per token position; None when the stage has no
    token axis (lm_head's last-token logits).

    Token-major stages are [seq, dim]; attention scores and softmax are [heads, seq, seq],
    whose token axis is the query (axis 1).
    """
    if n_tokens <= 1 and len(shape) < 2:
        return None
    if len(shape) == 3 and shape[1] == n_tokens:
        return np.ascontiguousarray(values.reshape(shape).transpose(1, 0, 2)).reshape(n_tokens, -1)
    if len(shape) >= 2 and shape[0] == n_tokens:
        return values.reshape(n_tokens, -1)
    if n_tokens > 0 and values.size % n_tokens == 0 and len(shape) != 1:
        return values.reshape(n_tokens, -1)
    return None


def per_token_cosine(rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair in float64; 0 where either row has zero norm (apr's rule)."""
    a = rows_a.astype(np.float64)
    b = rows_b.astype(np.float64)
    dot = np.einsum("ij,ij->i", a, b)  # [n_tokens]
    norms = np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b))
    return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)


def strip_text(
    values: np.ndarray, *, cosine: bool, threshold: float, token_labels: list[str]
) -> Text:
    """One coloured 7-column cell per token: the value on its heat colour, labels above."""
    styles = heat_styles("diverging" if cosine else "sequential")
    labels = Text()
    cells = Text()
    for position, value in enumerate(values):
        label = token_labels[position] if position < len(token_labels) else str(position)
        labels.append(f"{label[:6]:>7}", "dim")
        value = float(value)
        if not np.isfinite(value):
            cells.append(" ")
            cells.append(f"{'NaN':>6}", "bold bright_white on magenta")
            continue
        score = cosine_score(value, threshold) if cosine else std_score(value)
        text = cosine_text(value) if cosine else short_number(value)
        cells.append(" ")
        cells.append(f"{text:>6}", styles[score_index(score)])
    return Text.assemble(labels, "\n", cells)


class TokenStrip(Static):
    """Cosine(A, B) per token position (RMS of A per token without a reference)."""

    HELP = """
## Per-token strip

One cell per token position: the cosine between A's and B's rows for that token (the query
position for attention scores), coloured like the grid. Without a reference it shows the RMS of
A per token. A defect that hits one position (a RoPE offset, a mask) shows up here.
"""

    def show(
        self,
        values: np.ndarray | None,
        *,
        cosine: bool,
        threshold: float,
        token_labels: list[str],
    ) -> None:
        title = "per-token cosine(A, B)" if cosine else "per-token RMS of A"
        if values is None:
            self.update(Text.assemble((title, "bold"), "\n", ("no token axis", "dim")))
            return
        body = strip_text(values, cosine=cosine, threshold=threshold, token_labels=token_labels)
        self.update(Text.assemble((title, "bold"), "\n", body))
