"""Write any trace source as an APRT trace directory that `apr-tui bisect` / `compare` read.

Stage files through engine.aprt's writers (`layer-N/<stage>.bin`, `final_norm.bin`,
`lm_head.bin`), `tokens.json` with the source's token ids, and `source.json` with the source's
`record()` (engine, dtype, device, settings, conventions, stages not produced), so a saved
comparison says what was compared. A directory that already holds files is refused: nothing the
user did not ask for is overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import AprTuiError


def write_trace(
    source: Any,
    out_dir: str | Path,
    *,
    prompt: str | None = None,
    layers: range | None = None,
    model: str | Path | None = None,
) -> Path:
    """Stream `source.captures(layers)` to `out_dir` (one capture in memory at a time)."""
    from engine.aprt import write_stage
    from engine.sources.provenance import write_source_record
    from engine.trace_directory import write_tokens_json

    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AprTuiError(f"{target}: exists and is not an empty directory; not overwriting it")
    target.mkdir(parents=True, exist_ok=True)
    tokens = {
        "prompt": prompt if prompt is not None else getattr(source, "prompt", None),
        "model": model if model is not None else getattr(source, "path", None),
    }
    # Partial until the last write (engine.trace_directory): an interrupted dump never passes as complete.
    write_tokens_json(target, source.token_ids, **tokens, complete=False)
    for capture in source.captures(layers=layers):
        write_stage(target, capture.stage, capture.layer, capture.array)
    record = source.record() if hasattr(source, "record") else {"engine": source.kind}
    write_source_record(target, record)
    write_tokens_json(target, source.token_ids, **tokens, complete=True)
    return target
