"""APRT stage-tensor files (`apr trace --save-tensor`, §1.1 and §1.3): one file's bytes.

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

A directory of these files (which of them it holds, and the tokens.json beside them) is
engine.trace_directory's job.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from engine.errors import DiffError, FormatError, path_display
from engine.fileio import NotRegularFileError, atomic_file, open_regular
from engine.stages import U32_MAX, WHOLE_MODEL_LAYER, stage, stage_path

MAGIC = b"APRT"
HEADER_SIZE = 12
_HEADER = struct.Struct("<4sII")  # magic, layer, dim_product
_F32_LE = np.dtype("<f4")


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
    """Write to a temporary beside `path` (unnamed where Linux allows), then publish it
    (engine.fileio.atomic_file).

    Arrays go through `write` (not `ndarray.tofile`, whose short write is an OSError without
    errno or file name: "10752 requested and 4093 written"), so a full disk is reported as
    ENOSPC naming `path`.
    """
    with atomic_file(path, overwrite=overwrite) as handle:
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
    target = path if isinstance(path, Path) else Path(path)
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
