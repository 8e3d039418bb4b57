"""What a trace directory written from a non-apr source says about where it came from.

A saved comparison must say what was compared: which engine, dtype, device and the settings that
change numbers. Every source here can `record()` itself as a JSON object; a trace directory
written from it gets that object as `source.json` beside `tokens.json`; `read_source_record`
reads it back (bounded) so reports on the directory name the engine that produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.fileio import atomic_output

SOURCE_FILE = "source.json"
"""Name of the provenance record beside the stage files."""

MAX_RECORD_BYTES = 1 << 20
"""A record is a few hundred bytes; anything over 1 MiB is not one of ours and is not read."""

SOURCE_SCHEMA = "apr-tui-source-v1"
"""`schema` field of source.json, so a later reader can tell versions apart."""


def write_source_record(directory: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write `<dir>/source.json` (atomically) with `record` plus the schema tag."""
    target = Path(directory) / SOURCE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema": SOURCE_SCHEMA, **record}
    text = json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n"
    with atomic_output(target) as temp, open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
    return target


def read_source_record(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """`<dir>/source.json` as a dict, or None when absent or not an apr-tui record."""
    from engine.fileio import loads_json, read_regular

    path = Path(directory) / SOURCE_FILE
    if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
        return None
    try:
        document = loads_json(read_regular(path))
    except Exception:  # a damaged record only loses the description, never the comparison
        return None
    if not isinstance(document, dict) or document.get("schema") != SOURCE_SCHEMA:
        return None
    return document
