"""`engine` must be usable with no terminal UI: importing it never pulls in textual or rich."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import engine


def _engine_modules() -> list[str]:
    return [
        module.name
        for module in pkgutil.walk_packages(engine.__path__, prefix="engine.")
        if not module.ispkg or module.name.count(".") >= 1
    ]


def test_engine_modules_are_found():
    modules = _engine_modules()
    assert "engine.stages" in modules
    assert "engine.formats" in modules


def test_importing_every_engine_module_loads_no_ui_library():
    modules = _engine_modules()
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich'))\n"
        "print(','.join(leaked))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"engine imported UI modules: {result.stdout.strip()}"
