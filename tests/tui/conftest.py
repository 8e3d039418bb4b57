"""Real model files and trace directories for the TUI tests, and Pilot helpers.

Everything here is produced by the project's own writers (engine.formats.apr / gguf,
engine.aprt) from seeded synthetic models, so the app is driven by the engine's real output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.demo import DemoPair, build_small_demo
from engine.sources import open_pair

FINAL_STATES = ("finished", "failed", "cancelled")
SIZE = (150, 40)
"""Terminal size for Pilot tests: the whole 20-column grid fits (6 + 20 × 7 = 146)."""


@dataclass(frozen=True)
class TraceFixture:
    model: Path
    trace_dir: Path
    token_ids: list[int]


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory: pytest.TempPathFactory) -> DemoPair:
    """The small demo: a seeded 6-layer Llama and its copy with layer 2 up_proj ×18 (.apr)."""
    return build_small_demo(tmp_path_factory.mktemp("demo"))


def write_trace_dir(
    model_path: Path, directory: Path, token_ids: list[int] | None = None
) -> list[int]:
    """Trace `model_path` with our forward pass and write every stage as apr does."""
    from engine.aprt import write_stage
    from engine.trace_directory import write_tokens_json

    source, _ = open_pair(model_path, None, token_ids=token_ids, device="cpu")
    try:
        for capture in source.captures():
            write_stage(directory, capture.stage, capture.layer, capture.array)
        write_tokens_json(directory, source.token_ids, None, str(model_path))
        return list(source.token_ids)
    finally:
        source.close()


@pytest.fixture(scope="session")
def traced(demo_pair: DemoPair, tmp_path_factory: pytest.TempPathFactory) -> TraceFixture:
    """The defective demo model beside apr's default trace dir of the healthy one.

    Layout: `<tmp>/model.apr` (side A: the defective copy) and `<tmp>/model-trace/` (stage
    files of the healthy model), so `apr-tui model.apr` picks the directory up by default.
    """
    root = tmp_path_factory.mktemp("traced")
    model = root / "model.apr"
    model.write_bytes(demo_pair.model_b.read_bytes())
    trace_dir = root / "model-trace"
    ids = write_trace_dir(demo_pair.model_a, trace_dir)
    return TraceFixture(model, trace_dir, ids)


@pytest.fixture(scope="session")
def loud_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo model with layer 1's up_proj ×1000, written as a real .apr file."""
    from engine.demo import SMALL_ARCH, SMALL_DIMS, SMALL_SEED, plant_defect
    from engine.formats import apr
    from engine.synth import synthesize

    model = synthesize(SMALL_ARCH, seed=SMALL_SEED, **SMALL_DIMS)
    loud, _ = plant_defect(model, layer=1, factor=1000.0)
    return Path(apr.write(loud, tmp_path_factory.mktemp("loud") / "loud.apr"))


@pytest.fixture(scope="session")
def truncated_apr(demo_pair: DemoPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real .apr file cut in half (a bad file)."""
    data = demo_pair.model_a.read_bytes()
    path = tmp_path_factory.mktemp("bad") / "truncated.apr"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def unsupported_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A well-formed GGUF (our writer) whose architecture is gpt2: unsupported."""
    from engine.formats import gguf
    from engine.formats.gguf import with_config
    from engine.synth import synthesize

    path = tmp_path_factory.mktemp("unsupported") / "gpt2.gguf"
    model = synthesize("llama", seed=3, num_layers=1, hidden_size=32, intermediate_size=64)
    gguf.write(with_config(model, architecture="gpt2"), path)
    return path


class Notifications(list):
    """The notifications an app shows, recorded from Textual's public `Notify` message.

    Pass one as `app.run_test(message_hook=notes)`; it keeps each `Notification` (message,
    title, severity) in the order the app raised them.
    """

    def __call__(self, message) -> None:
        from textual.notifications import Notify

        if isinstance(message, Notify):
            self.append(message.notification)

    @property
    def messages(self) -> list[str]:
        return [notification.message for notification in self]


async def workers_done(app, timeout: float = 120.0) -> None:
    """Wait until every worker of `app` has finished; fail after `timeout` seconds (a hung
    worker must fail its test, not hang the suite)."""
    import asyncio

    await asyncio.wait_for(app.workers.wait_for_complete(), timeout)


async def settle(pilot, timeout: float = 120.0) -> None:
    """Wait until the engine run has ended and its messages are drawn; fail loudly after
    `timeout` seconds instead of falling through."""

    app = pilot.app
    await workers_done(app, timeout)
    for _ in range(int(timeout / 0.01)):
        if app.state in FINAL_STATES:
            break
        await pilot.pause(0.01)
    else:
        raise AssertionError(f"the engine run did not end within {timeout} s (state {app.state})")
    await pilot.pause()
    await pilot.pause()


def explorer(model_a: Path, model_b: Path | None, **options):
    """The app as `apr-tui MODEL --ref REF` builds it, with the clock hidden."""
    from aprtui.app import make_app

    prompt = options.pop("prompt", None)
    token_ids = options.pop("token_ids", None)
    options.setdefault("clock", None)

    def open_sources():
        return open_pair(model_a, model_b, prompt=prompt, token_ids=token_ids, device="cpu")

    if model_b is not None and model_b.is_dir():
        options.setdefault("reference_dir", model_b)
    options.setdefault("single_model", model_b is None)
    return make_app(open_sources, **options)


def screen_text(widget) -> str:
    """What a widget shows on screen, as plain text lines (read back from its render)."""
    from textual.geometry import Region

    width, height = widget.outer_size  # border and padding included
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, width, height)))


def painted_style(grid, row: int, col: int, *, gap: bool = False):
    """The rich Style the grid paints one cell's text with (or, `gap=True`, the marker column
    before it), read back from its rendered line."""
    from aprtui.widgets.stage_grid import CELL_WIDTH, LABEL_WIDTH

    strip = grid.render_line(1 + row - grid.scroll_offset.y)
    x = LABEL_WIDTH + col * CELL_WIDTH - grid.scroll_offset.x + (0 if gap else 1)
    for segment in strip:
        if x < segment.cell_length:
            return segment.style
        x -= segment.cell_length
    raise AssertionError(f"cell ({row}, {col}) is not on screen")


def painted_gap(grid, row: int, col: int) -> str:
    """The character in the marker column before a cell (` `, `▶` or `!`)."""
    from aprtui.widgets.stage_grid import CELL_WIDTH, LABEL_WIDTH

    line = grid.render_line(1 + row - grid.scroll_offset.y).text
    return line[LABEL_WIDTH + col * CELL_WIDTH - grid.scroll_offset.x]
