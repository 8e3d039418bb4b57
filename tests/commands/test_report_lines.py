"""Report lines (aprtui.commands.output): the grid `apr-tui bisect` prints is laid out as Rich
lays out the same table, and a piped report never imports Rich.

Rich is the oracle here: the piped bisect report used to be a Rich `Table` and must read the
same (trailing spaces aside, which Rich padded and we strip)."""

from __future__ import annotations

import io
import random
import subprocess
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from aprtui.commands.output import line_text, table_lines


def _rich_grid(header: list[str], rows: list[list], min_width: int) -> list[str]:
    """The table as `apr-tui bisect` built it before: Rich's own layout."""
    table = Table(title=None, show_lines=False, pad_edge=False, box=None, padding=(0, 1))
    table.add_column(header[0], justify="right", style="bold", min_width=min_width, no_wrap=True)
    for name in header[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*[c if isinstance(c, str) else Text(c[0], style=c[1]) for c in row])
    out = io.StringIO()
    console = Console(file=out, width=1000, highlight=False, no_color=True, soft_wrap=True)
    console.print(table)
    return [line.rstrip() for line in out.getvalue().splitlines()]


def test_table_lines_match_richs_layout_on_random_grids() -> None:
    rng = random.Random(7)
    marks = ["", "·", "=", "≠3", "size≠"]
    for _ in range(60):
        columns = rng.randint(1, 12)
        header = ["layer"] + [
            rng.choice(["emb", "qkv", "attn_n", "f_norm", "x" * 9]) for _ in range(columns)
        ]
        rows = []
        for layer in range(rng.randint(0, 8)):
            row = [(rng.choice([str(layer), "model", str(layer * 1000)]), "bold")]
            for _ in range(columns):
                kind = rng.random()
                if kind < 0.6:
                    text = f"{rng.random():.4f}" + ("*" if rng.random() < 0.2 else "")
                    if rng.random() < 0.1:
                        text = "◆" + text
                    row.append((text, "green"))
                else:
                    row.append(rng.choice(marks))
            rows.append(row)
        ours = [line_text(line).rstrip() for line in table_lines(header, rows, min_widths=[5])]
        assert ours == _rich_grid(header, rows, 5)


def test_table_lines_keep_each_cells_style_and_pad_outside_it() -> None:
    lines = table_lines(["layer", "cos"], [[("0", "bold"), ("0.5000", "red")]], min_widths=[5])
    header, row = lines
    assert header == ["", ("layer", "bold"), "     ", ("cos", "bold")]  # "cos" under "0.5000"
    assert row == ["    ", ("0", "bold"), "  ", ("0.5000", "red")]


def test_piped_report_is_plain_text_and_never_imports_rich() -> None:
    code = (
        "import sys\n"
        "from aprtui.commands.output import print_lines\n"
        "print_lines([('=== title ===', 'bold cyan'), ['a ', ('[b]', 'red'), ' :smile:  '], ''])\n"
        "assert not any(m == 'rich' or m.startswith('rich.') for m in sys.modules), 'rich'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    # Markup-like text and emoji codes are printed as they are; trailing spaces are dropped.
    assert done.stdout == "=== title ===\na [b] :smile:\n\n"
