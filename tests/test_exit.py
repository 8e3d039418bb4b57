"""The `apr-tui` command's exit (aprtui.cli.entry): the cyclic collector is kept out of the
interpreter's shutdown, and nothing a run writes is lost by it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import atexit, gc, json, sys
seen = {}
atexit.register(lambda: print(json.dumps({"frozen": gc.get_freeze_count()}), file=sys.stderr))
sys.argv = ["apr-tui", "--version"]
from aprtui.cli import entry
raise SystemExit(entry())
"""


def test_the_command_freezes_what_is_left_before_the_interpreter_exits() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("apr-tui ")  # the output was flushed all the same
    assert json.loads(done.stderr.strip().splitlines()[-1])["frozen"] > 1000


def test_main_called_in_process_leaves_the_collector_alone(capsys) -> None:
    import gc

    from aprtui.cli import main

    before = gc.get_freeze_count()
    assert main(["--version"]) == 0
    assert gc.get_freeze_count() == before
    assert capsys.readouterr().out.startswith("apr-tui ")
