"""APRT stage-tensor files and trace directories (`apr trace --save-tensor`, §1.1 and §1.3).

An APRT file is a 12-byte header (`b"APRT"`, u32 LE layer, u32 LE dim_product) followed by
dim_product little-endian f32 values. There is no shape, dtype or stage name inside: the stage
is the file name. Whole-model stages (`final_norm`, `lm_head`) carry the layer sentinel
0xFFFFFFFF and live at the trace root; per-layer stages live in `layer-<N>/<stage>.bin`.

Values travel as raw bytes in both directions, so NaN payloads, ±Inf and -0.0 survive bit for
bit. Reading checks the file size against the header before allocating anything, so a corrupt
dim_product cannot make us allocate more than the file holds. Writing goes to a temporary name
in the target directory and is published in one step (engine.fileio.atomic_output), so a reader
never sees a half-written file, and a writer told not to overwrite never replaces a file that
appeared meanwhile.

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

import itertools
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from engine.errors import DiffError, FormatError, path_display, path_text
from engine.fileio import (
    ANY_TEMP_NAME,
    NotRegularFileError,
    atomic_output,
    loads_json,
    open_regular,
    read_regular,
)
from engine.stages import (
    ALIASES,
    STAGE_BY_NAME,
    U32_MAX,
    WHOLE_MODEL_LAYER,
    stage,
    stage_path,
)

MAGIC = b"APRT"
HEADER_SIZE = 12
_HEADER = struct.Struct("<4sII")  # magic, layer, dim_product
_F32_LE = np.dtype("<f4")

TOKENS_FILE = "tokens.json"
TOKENS_SCHEMA = "apr-tui-tokens-v1"
PROVENANCE_FILE = "_PROVENANCE.txt"
"""Written beside the stage files by aprender's HF reference script; understood and skipped."""
SOURCE_RECORD_FILE = "source.json"
"""engine.sources.provenance's record of the engine that wrote a directory (not a stage file)."""

_LAYER_DIR = re.compile(r"layer-(0|[1-9][0-9]*)", re.ASCII)
_TEMP_NAME = ANY_TEMP_NAME  # in-flight (or killed) writes of ours: never stage files


class AprtFormatError(FormatError):
    """An APRT file that cannot be read: `<path>: <reason>` (reason in apr's wording)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class AprtOpenError(AprtFormatError):
    """An APRT file that cannot be opened at all (missing, permission, ...)."""


@dataclass(frozen=True)
class AprtHeader:
    layer: int
    dim_product: int

    @property
    def is_whole_model(self) -> bool:
        return self.layer == WHOLE_MODEL_LAYER


@dataclass
class AprtTensor:
    """One APRT file as read: its header layer and its values (1-D float32, writable)."""

    path: Path
    layer: int
    values: np.ndarray  # [dim_product] float32

    @property
    def dim_product(self) -> int:
        return int(self.values.size)

    @property
    def is_whole_model(self) -> bool:
        return self.layer == WHOLE_MODEL_LAYER


def _rust_io_text(error: OSError) -> str:
    """An OSError the way Rust's io::Error displays it: `No such file or directory (os error 2)`."""
    if isinstance(error, NotRegularFileError):
        return "not a regular file"
    if error.errno is None:
        return str(error)
    return f"{os.strerror(error.errno)} (os error {error.errno})"


def _check_header(path: str | os.PathLike[str], header_bytes: bytes, file_size: int) -> AprtHeader:
    """Validate the 12 header bytes against the file size; the body is not read here."""
    if len(header_bytes) < HEADER_SIZE:
        raise AprtFormatError(
            path,
            f"save-tensor header truncated: got {len(header_bytes)} bytes, need {HEADER_SIZE}",
        )
    magic, layer, dim_product = _HEADER.unpack(header_bytes[:HEADER_SIZE])
    if magic != MAGIC:
        raise AprtFormatError(
            path,
            f"save-tensor magic mismatch: got {list(magic)}, expected {list(MAGIC)}",
        )
    body_bytes = file_size - HEADER_SIZE
    if body_bytes < 4 * dim_product:
        raise AprtFormatError(
            path,
            "save-tensor body length mismatch: "
            f"header says {4 * dim_product} bytes ({dim_product} f32s), got {body_bytes}",
        )
    return AprtHeader(layer=layer, dim_product=dim_product)


def _open(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading; anything else (missing, directory, FIFO) is an error.

    A FIFO or device is refused without blocking (engine.fileio.open_regular).
    """
    try:
        return open_regular(path)
    except OSError as error:
        raise AprtOpenError(path, f"cannot open: {_rust_io_text(error)}") from None


def read_aprt_header(path: str | os.PathLike[str]) -> AprtHeader:
    """The header of an APRT file, checked against the file size (12 bytes read)."""
    with _open(path) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            header_bytes = handle.read(HEADER_SIZE)
        except OSError as error:
            raise AprtFormatError(path, f"save-tensor I/O error: {_rust_io_text(error)}") from None
    return _check_header(path, header_bytes, size)


def read_aprt(path: str | os.PathLike[str]) -> AprtTensor:
    """Read an APRT file bit-exactly. Trailing bytes after the body are ignored, as apr does."""
    with _open(path) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            header = _check_header(path, handle.read(HEADER_SIZE), size)
            # count bounds the read; the size check above bounds count by the file size.
            values = np.fromfile(handle, dtype=_F32_LE, count=header.dim_product)
        except OSError as error:
            raise AprtFormatError(path, f"save-tensor I/O error: {_rust_io_text(error)}") from None
    if values.size != header.dim_product:  # the file shrank between fstat and read
        raise AprtFormatError(
            path,
            "save-tensor body length mismatch: "
            f"header says {4 * header.dim_product} bytes ({header.dim_product} f32s), "
            f"got {4 * values.size}",
        )
    return AprtTensor(Path(path), header.layer, values.astype(np.float32, copy=False))


def check_aprt_pair(
    path_a: str | os.PathLike[str],
    a: AprtHeader | AprtTensor,
    path_b: str | os.PathLike[str],
    b: AprtHeader | AprtTensor,
    *,
    same_layer: bool = True,
) -> None:
    """apr diff's checks of two APRT stage files before an element-wise diff, in apr's order
    and words (§2.2): the element counts (`dim_product`) first, then the layers.

    `same_layer=False` skips the layer check: the file browser diffs a stage with another
    layer's on purpose (how a shifted layer is found) and says so beside the numbers. The paths
    are passed as the user gave them (apr prints them so), not as `Path` normalizes them.
    Raises DiffError.
    """
    if a.dim_product != b.dim_product:
        raise DiffError(
            f"APRT dim_product mismatch: {path_display(path_a)} has {a.dim_product} f32s, "
            f"{path_display(path_b)} has {b.dim_product} f32s — cannot compare stage tensors "
            "of different sizes"
        )
    if same_layer and a.layer != b.layer:
        raise DiffError(
            f"APRT layer mismatch: {path_display(path_a)} is layer {a.layer}, "
            f"{path_display(path_b)} is layer {b.layer} — stages from different layers cannot "
            "be compared element-wise"
        )


def _to_host_f32(values: Any) -> np.ndarray:
    """Flatten to a C-contiguous little-endian f32 host array without touching the bits."""
    if hasattr(values, "get") and type(values).__module__.startswith("cupy"):
        values = values.get()
    array = np.asarray(values)
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    return np.ascontiguousarray(array.reshape(-1), dtype=_F32_LE)


def _atomic_write(path: Path, chunks: Iterable[bytes | np.ndarray], overwrite: bool = True) -> None:
    """Write to a hidden temporary name beside `path`, then publish it (atomic_output).

    Arrays go through `write` (not `ndarray.tofile`, whose short write is an OSError without
    errno or file name: "10752 requested and 4093 written"), so a full disk is reported as
    ENOSPC naming `path`.
    """
    with atomic_output(path, overwrite=overwrite) as temp, open(temp, "wb") as handle:
        for chunk in chunks:
            if isinstance(chunk, np.ndarray):
                handle.write(memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)))
            else:
                handle.write(chunk)


def write_aprt(
    path: str | os.PathLike[str], layer: int, values: Any, *, overwrite: bool = True
) -> Path:
    """Write `values` (any shape, numpy or CuPy; cast to f32, flattened in C order) as APRT.
    A lazy capture (`.blocks()`, `.size`) is written a block at a time.

    `layer` goes into the header as given (0..0xFFFFFFFF); use `write_stage` for the
    whole-model sentinel rule. With `overwrite=False` an existing file (also one that appears
    while this writes) is never replaced: engine.fileio.OutputExistsError.
    """
    if not 0 <= int(layer) <= U32_MAX:
        raise ValueError(f"APRT layer must be in 0..=0xFFFFFFFF, got {layer}")
    if hasattr(values, "blocks"):  # a lazy capture (a long prompt's attention): streamed
        count = int(values.size)
        if count > U32_MAX:
            raise ValueError(f"APRT holds at most 2**32-1 values, got {count}")
        header = _HEADER.pack(MAGIC, int(layer), count)
        blocks = (_to_host_f32(block) for _, block in values.blocks())
        _atomic_write(Path(path), itertools.chain([header], blocks), overwrite)
        return Path(path)
    body = _to_host_f32(values)
    if body.size > U32_MAX:
        raise ValueError(f"APRT holds at most 2**32-1 values, got {body.size}")
    target = Path(path)
    _atomic_write(target, [_HEADER.pack(MAGIC, int(layer), body.size), body], overwrite)
    return target


def write_stage(
    directory: str | os.PathLike[str],
    stage_name: str,
    layer: int,
    values: Any,
    *,
    overwrite: bool | Callable[[Path], bool] = True,
) -> Path:
    """Write one stage capture where apr puts it, creating `layer-N/` as needed.

    Per-layer stages go to `<dir>/layer-<N>/<stage>.bin` with header layer N; whole-model stages
    go to `<dir>/<stage>.bin` with header layer 0xFFFFFFFF whatever `layer` says (§1.3).
    `overwrite` may be a predicate on the stage path (a trace replaces only the files it
    vetted before it started).
    """
    try:
        selected = stage(stage_name)
    except KeyError:
        raise ValueError(f"unknown stage {stage_name!r}") from None
    if selected.per_layer:
        if not 0 <= layer < WHOLE_MODEL_LAYER:
            raise ValueError(f"per-layer stage {selected.name} needs a layer in 0..0xFFFFFFFE")
        header_layer = layer
    else:
        header_layer = WHOLE_MODEL_LAYER
    path = stage_path(directory, selected.name, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    allowed = overwrite(path) if callable(overwrite) else overwrite
    return write_aprt(path, header_layer, values, overwrite=allowed)


def write_stage_stream(
    directory: str | os.PathLike[str],
    stage_name: str,
    layer: int,
    count: int,
    blocks: Iterable[Any],
    *,
    overwrite: bool | Callable[[Path], bool] = True,
) -> Path:
    """`write_stage` for a tensor that arrives in blocks (a long prompt's attention stages).

    `blocks`: arrays (numpy or CuPy) whose flattened values, in order, are the payload; `count`
    values in all, which the header states up front. Only one block is held at a time. Written
    to a temporary name and renamed, like every stage file; if the blocks hold more or fewer
    than `count` values, ValueError and nothing is left behind.
    """
    selected = stage(stage_name)
    if not 0 <= count <= U32_MAX:
        raise ValueError(f"APRT holds at most 2**32-1 values, got {count}")
    header_layer = layer if selected.per_layer else WHOLE_MODEL_LAYER
    path = stage_path(directory, selected.name, layer)
    path.parent.mkdir(parents=True, exist_ok=True)

    def chunks() -> Iterator[bytes | np.ndarray]:
        yield _HEADER.pack(MAGIC, int(header_layer), count)
        written = 0
        for block in blocks:
            body = _to_host_f32(block)
            written += body.size
            if written > count:
                break
            yield body
        if written != count:
            raise ValueError(f"{path}: blocks held {written} values, the header says {count}")

    allowed = overwrite(path) if callable(overwrite) else overwrite
    _atomic_write(path, chunks(), allowed)  # type: ignore[arg-type]
    return path


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
