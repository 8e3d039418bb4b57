"""Every key of every screen, in one list (`?` / F1)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEY_NAMES = {
    "question_mark": "?",
    "escape": "esc",
    "enter": "enter",
    "space": "space",
    "ctrl+c": "ctrl+c",
    "ctrl+p": "ctrl+p",
}


def key_label(binding: Binding) -> str:
    """`up / k` for a binding of several keys, with readable key names."""
    if binding.key_display:
        return binding.key_display
    keys = [key.strip() for key in binding.key.split(",")]
    return " / ".join(KEY_NAMES.get(key, key) for key in keys)


def as_bindings(bindings: Iterable[BindingType]) -> list[Binding]:
    out = []
    for binding in bindings:
        if isinstance(binding, Binding):
            out.append(binding)
        else:
            key, action, *rest = binding
            out.append(Binding(key, action, rest[0] if rest else ""))
    return out


def keys_table(sections: Sequence[tuple[str, Iterable[BindingType]]]) -> Table:
    """One table: a bold heading row per section, then `key  description` rows."""
    table = Table(box=None, show_header=False, pad_edge=False, expand=False)
    table.add_column("key", style="bold cyan", min_width=14)
    table.add_column("what it does")
    for index, (title, bindings) in enumerate(sections):
        if index:
            table.add_row("", "")
        table.add_row(Text(title, style="bold underline"), "")
        for binding in as_bindings(bindings):
            table.add_row(key_label(binding), binding.description or binding.action)
    return table


GRID_MOUSE = "Mouse: click a grid cell to move there, click it again to open it."
TREE_MOUSE = "Mouse: click a file to show it, a directory to open or close it."


class HelpScreen(ModalScreen[None]):
    """A modal list of all key bindings, grouped by where they work."""

    BINDINGS = [
        Binding("escape,q,question_mark,f1", "dismiss", "Close help", key_display="esc / q / ?"),
    ]

    def __init__(
        self,
        sections: Sequence[tuple[str, Iterable[BindingType]]],
        notes: Sequence[str] = (),
        mouse: str = GRID_MOUSE,
    ) -> None:
        super().__init__()
        self.sections = list(sections)
        self.notes = list(notes)
        """Lines under the keys: where things land (the `s` save directory), and the like."""
        self.mouse = mouse
        """What the mouse does in this app (the explorer's grid, or the file browser's tree)."""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(Text("apr-tui keys", style="bold"), id="help-title")
            yield Static(keys_table(self.sections), id="help-keys")
            yield Static(
                "\n".join(
                    [
                        *self.notes,
                        f"{self.mouse} ctrl+p opens the command palette: every key above by "
                        "its name.",
                    ]
                ),
                id="help-mouse",
                markup=False,
            )
