"""Trace directories (§1.3): which APRT stage files a directory holds, and its tokens.json.

A trace directory holds per-layer stages in `layer-<N>/<stage>.bin`, whole-model stages at the
root, and beside them apr-tui's `tokens.json` (the token ids traced, the prompt and model, and
whether the run finished). The bytes of one stage file are engine.aprt's job; this module
finds the files, checks each one sits where its header says, and reads and writes tokens.json.
(engine.sources.trace_dir turns such a directory into a trace source.)

A trace directory is complete only when the run that wrote it finished: `tokens.json` carries
`"complete": false` from the start of a run and `"complete": true` as the run's last write, so a
Ctrl+C, a SIGKILL or a full disk leaves a directory that says it is partial (`TraceDir.complete`).
Directories written by `apr trace` (no tokens.json) or by older apr-tui (no field) say nothing:
`complete` is None there.

A file at one of apr's stage names whose header is unreadable, or whose header layer disagrees
with where it sits, is a corrupt stage file, not an unknown one: `read_trace_dir` refuses the
directory (FormatError naming the file) unless called with `strict=False` (the file browser,
which lists such files with the reason).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.aprt import AprtFormatError, _atomic_write, _rust_io_text, read_aprt_header
from engine.errors import FormatError, path_text
from engine.fileio import ANY_TEMP_NAME, loads_json, read_regular
from engine.stages import ALIASES, STAGE_BY_NAME, U32_MAX, WHOLE_MODEL_LAYER

TOKENS_FILE = "tokens.json"
TOKENS_SCHEMA = "apr-tui-tokens-v1"
PROVENANCE_FILE = "_PROVENANCE.txt"
"""Written beside the stage files by aprender's HF reference script; understood and skipped."""
SOURCE_RECORD_FILE = "source.json"
"""engine.sources.provenance's record of the engine that wrote a directory (not a stage file)."""

_LAYER_DIR = re.compile(r"layer-(0|[1-9][0-9]*)", re.ASCII)
_TEMP_NAME = ANY_TEMP_NAME  # in-flight (or killed) writes of ours: never stage files


# ----------------------------------------------------------------------------- tokens.json


@dataclass(frozen=True)
class TokensInfo:
    """The contents of a trace's tokens.json (schema apr-tui-tokens-v1)."""

    token_ids: list[int]
    prompt: str | None = None
    model: str | None = None
    complete: bool | None = None
    """False while (or after an interrupted) run writes the directory, True when it finished,
    None when the file does not say (written before the field existed)."""


def write_tokens_json(
    directory: str | os.PathLike[str],
    token_ids: list[int],
    prompt: str | None = None,
    model: str | os.PathLike[str] | None = None,
    *,
    complete: bool = True,
) -> Path:
    """Write `<dir>/tokens.json` beside the stage files (the directory is created).

    A run writes it with `complete=False` before its first stage file and again with
    `complete=True` as its very last write. The model path is stored as text (bytes of a
    name that are not UTF-8 as `\\xNN`), so any path can be recorded.
    """
    ids = [int(token) for token in token_ids]
    if any(not 0 <= token <= U32_MAX for token in ids):
        raise ValueError("token ids must be in 0..2**32")
    document = {
        "schema": TOKENS_SCHEMA,
        "token_ids": ids,
        "prompt": prompt,
        "model": None if model is None else path_text(model),
        "complete": bool(complete),
    }
    target = Path(directory) / TOKENS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(target, [text.encode("utf-8")])
    return target


def read_tokens_json(path: str | os.PathLike[str]) -> TokensInfo:
    """Read and validate a tokens.json file; any defect is a FormatError naming the file."""

    def bad(reason: str) -> FormatError:
        return FormatError(f"{os.fspath(path)}: {reason}")

    try:
        text = read_regular(path).decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    except OSError as error:
        raise bad(f"cannot read: {_rust_io_text(error)}") from None
    try:
        document = loads_json(text)
    except json.JSONDecodeError as error:
        raise bad(
            f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(document, dict):
        raise bad("expected a JSON object")
    if document.get("schema") != TOKENS_SCHEMA:
        raise bad(f'"schema" must be "{TOKENS_SCHEMA}", got {json.dumps(document.get("schema"))}')
    ids = document.get("token_ids")
    if not isinstance(ids, list) or not all(
        isinstance(token, int) and not isinstance(token, bool) and 0 <= token <= U32_MAX
        for token in ids
    ):
        raise bad('"token_ids" must be a list of integers in 0..2**32')
    for key in ("prompt", "model"):
        if document.get(key) is not None and not isinstance(document[key], str):
            raise bad(f'"{key}" must be a string or null')
    complete = document.get("complete")
    if complete is not None and not isinstance(complete, bool):
        raise bad('"complete" must be true or false')
    return TokensInfo(ids, document.get("prompt"), document.get("model"), complete)


# ----------------------------------------------------------------------------- trace dirs


@dataclass
class TraceDir:
    """What a trace directory holds.

    `entries` maps (layer, stage name) to the file, in computation order: layer by layer in
    canonical stage order, then the whole-model stages under WHOLE_MODEL_LAYER. Every file
    listed there has a valid header whose layer agrees with where the file sits and a body as
    long as its header says. Everything else found is listed in `unknown` with the reason.
    """

    root: Path
    entries: dict[tuple[int, str], Path] = field(default_factory=dict)
    unknown: list[tuple[Path, str]] = field(default_factory=list)
    token_ids: list[int] | None = None
    prompt: str | None = None
    model: str | None = None
    complete: bool | None = None
    """True: the run that wrote the directory finished. False: it was interrupted, failed, or
    is still writing (the stage files present are whole, but stages are missing). None: the
    directory does not say (apr's own traces, or apr-tui before the field existed)."""
    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    """Files at one of apr's stage names whose header cannot be read or disagrees with their
    place (also listed in `unknown`). `read_trace_dir` refuses them unless strict=False."""

    @property
    def incomplete_note(self) -> str | None:
        """One line for a directory whose run did not finish (`complete` is False), naming
        what it holds; None for a complete directory or one that does not say. Every reader
        (diff, bisect, the explorer, the file browser) shows it rather than treat a partial
        trace as a full reference."""
        if self.complete is not False:
            return None
        layers = self.layers
        held = f"layers {layers[0]}..{layers[-1] + 1}" if layers else "no per-layer stage"
        return (
            f"{self.root} is an incomplete trace: the run that wrote it did not finish "
            f"(tokens.json says complete: false); it holds {len(self.entries)} stage files "
            f"({held}), later stages are missing"
        )

    @property
    def layers(self) -> list[int]:
        """The per-layer indices present, ascending."""
        return sorted({layer for layer, _ in self.entries if layer != WHOLE_MODEL_LAYER})


def _stage_file_problem(name: str, per_layer_dir: bool) -> str | None:
    """Why a file name is not a stage file for its place, or None if it is one."""
    if not name.endswith(".bin"):
        return "not a .bin stage file"
    stem = name[: -len(".bin")]
    if stem in ALIASES:
        return f"alias file name; apr writes the canonical name {ALIASES[stem]}.bin"
    known = STAGE_BY_NAME.get(stem)
    if known is None:
        return f"unknown stage name {stem!r}"
    if per_layer_dir and not known.per_layer:
        return f"whole-model stage {stem} inside a layer directory (apr writes it at the root)"
    if not per_layer_dir and known.per_layer:
        return f"per-layer stage {stem} at the root (apr writes it in layer-N/)"
    return None


def read_trace_dir(path: str | os.PathLike[str], *, strict: bool = True) -> TraceDir:
    """Discover the stage files of a trace directory (headers only; no tensor is loaded).

    Raises FormatError for a missing path, a non-directory, a directory without a single valid
    stage file, a malformed tokens.json, or (when `strict`) a corrupt stage file: a reference
    with a broken stage must not pass as one whose stage is merely absent. Files it does not
    understand are reported in `.unknown` instead (corrupt ones also in `.corrupt`).
    """
    root = Path(path)
    if not root.exists():
        raise FormatError(f"{root}: no such directory")
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory")
    trace = TraceDir(root=root)
    found: list[tuple[int, str, Path]] = []

    def consider(file: Path, expected_layer: int, per_layer_dir: bool) -> None:
        problem = _stage_file_problem(file.name, per_layer_dir)
        if problem is not None:
            trace.unknown.append((file, problem))
            return
        try:
            header = read_aprt_header(file)
        except AprtFormatError as error:
            trace.unknown.append((file, error.reason))
            trace.corrupt.append((file, error.reason))
            return
        if header.layer != expected_layer:
            where = "its directory" if per_layer_dir else "the root (whole-model)"
            reason = f"header layer {header.layer} disagrees with {where} ({expected_layer})"
            trace.unknown.append((file, reason))
            trace.corrupt.append((file, reason))
            return
        found.append((expected_layer, file.name[: -len(".bin")], file))

    try:
        children = sorted(root.iterdir())
    except OSError as error:
        raise FormatError(f"{root}: cannot list: {_rust_io_text(error)}") from None
    for child in children:
        if _TEMP_NAME.fullmatch(child.name):
            continue  # an in-flight write of ours
        if child.is_dir():
            match = _LAYER_DIR.fullmatch(child.name)
            if match is None or int(match.group(1)) >= WHOLE_MODEL_LAYER:
                trace.unknown.append((child, "directory is not layer-<N>"))
                continue
            layer = int(match.group(1))
            try:
                grandchildren = sorted(child.iterdir())
            except OSError as error:
                trace.unknown.append((child, f"cannot list: {_rust_io_text(error)}"))
                continue
            for file in grandchildren:
                if _TEMP_NAME.fullmatch(file.name):
                    continue
                if file.is_dir():
                    trace.unknown.append((file, "unexpected directory inside layer-<N>"))
                else:
                    consider(file, layer, per_layer_dir=True)
        elif child.name == TOKENS_FILE:
            info = read_tokens_json(child)
            trace.token_ids, trace.prompt, trace.model = info.token_ids, info.prompt, info.model
            trace.complete = info.complete
        elif child.name in (PROVENANCE_FILE, SOURCE_RECORD_FILE):
            continue  # metadata of ours, read by the trace-directory source
        else:
            consider(child, WHOLE_MODEL_LAYER, per_layer_dir=False)

    if strict and trace.corrupt:
        file, reason = trace.corrupt[0]
        more = f" (and {len(trace.corrupt) - 1} more)" if len(trace.corrupt) > 1 else ""
        raise FormatError(f"{file}: corrupt stage file: {reason}{more}")
    if not found:
        raise FormatError(
            f"{root}: no APRT stage files (expected layer-<N>/<stage>.bin or "
            "final_norm.bin / lm_head.bin)"
        )
    order = {name: s.index for name, s in STAGE_BY_NAME.items()}  # apr's + apr-tui's
    for layer, name, file in sorted(found, key=lambda item: (item[0], order[item[1]])):
        trace.entries[(layer, name)] = file
    return trace
