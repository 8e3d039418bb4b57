"""The tensor files of another engine's dump: `.npy` files, `.npz` archives, safetensors files.

`index_dump` lists every tensor of a dump (a directory of such files, or one file) by name, with
its shape and a loader that reads it as float32 only when asked; engine.sources.tensor_dump
decides through a name map which of them is which apr stage.

Readers are bounded and defensive like our own formats: safetensors through
engine.formats.safetensors.read_header (every offset checked against the file size), `.npy`
headers parsed by numpy with the body size checked against the file before it is mapped, `.npz`
members checked against their declared size; only float16/32/64 and bfloat16 payloads, never
pickles. Errors are one line naming the file.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FormatError
from engine.fileio import open_regular

MAX_FILES = 100_000
"""Most files a dump directory may hold (a bound on listing, not a format rule)."""

MAX_DEPTH = 4
"""How deep `.npy` files are looked for below the dump directory."""

MAX_TENSOR_BYTES = 16 * 1024**3
"""Largest single tensor accepted (an `.npz` member's declared size is checked before reading)."""

_FLOAT_KINDS = {"f2", "f4", "f8"}


# ------------------------------------------------------------------------------- readers

Loader = Callable[[], np.ndarray]


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.hasobject or dtype.kind != "f" or f"f{dtype.itemsize}" not in _FLOAT_KINDS:
        raise FormatError(f"{where}: dtype {dtype}, expected float16, float32 or float64")


def _npy_header(handle: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream positioned at its start."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(handle)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as error:
        raise FormatError(f"{where}: not a readable .npy file: {error}") from None
    _check_dtype(dtype, where)
    if math.prod(shape) * dtype.itemsize > MAX_TENSOR_BYTES:
        raise FormatError(f"{where}: tensor {shape} larger than {MAX_TENSOR_BYTES} bytes")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _npy_loader(path: Path) -> tuple[tuple[int, ...], Loader]:
    with open_regular(path) as handle:
        shape, fortran, dtype = _npy_header(handle, str(path))
        offset = handle.tell()
        size = os.fstat(handle.fileno()).st_size
    need = math.prod(shape) * dtype.itemsize
    if size - offset != need:
        raise FormatError(f"{path}: .npy body is {size - offset} bytes, its header needs {need}")

    def load() -> np.ndarray:
        if need == 0:
            return np.zeros(shape, dtype=np.float32)
        order = "F" if fortran else "C"
        data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        return np.array(data, dtype=np.float32, order="C")

    return shape, load


def _npz_loaders(path: Path) -> dict[str, tuple[tuple[int, ...], Loader]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise FormatError(f"{path}: not a readable .npz archive: {error}") from None
    found: dict[str, tuple[tuple[int, ...], Loader]] = {}
    with archive:
        members = archive.infolist()
        if len(members) > MAX_FILES:
            raise FormatError(f"{path}: more than {MAX_FILES} members")
        for info in members:
            if not info.filename.endswith(".npy"):
                continue
            where = f"{path}:{info.filename}"
            if info.file_size > MAX_TENSOR_BYTES:
                raise FormatError(f"{where}: {info.file_size} bytes uncompressed, too large")
            with archive.open(info) as member:
                shape, fortran, dtype = _npy_header(member, where)
                offset = member.tell()
            need = math.prod(shape) * dtype.itemsize
            if info.file_size - offset != need:
                raise FormatError(
                    f"{where}: body is {info.file_size - offset} bytes, its header needs {need}"
                )

            def load(
                info=info, shape=shape, fortran=fortran, dtype=dtype, offset=offset, need=need
            ) -> np.ndarray:
                with zipfile.ZipFile(path) as again, again.open(info) as member:
                    member.read(offset)
                    body = member.read(need + 1)
                if len(body) != need:
                    raise FormatError(f"{path}:{info.filename}: body shorter than its header says")
                values = np.frombuffer(body, dtype=dtype)
                values = values.reshape(shape, order="F" if fortran else "C")
                return np.array(values, dtype=np.float32, order="C")

            found[info.filename[: -len(".npy")]] = (shape, load)
    return found


def _safetensors_loaders(path: Path) -> dict[str, tuple[tuple[int, ...], Loader]]:
    from engine.formats.safetensors import read_header

    dtypes = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}
    found: dict[str, tuple[tuple[int, ...], Loader]] = {}
    for name, entry in read_header(path).items():
        if entry.dtype not in dtypes:
            raise FormatError(
                f"{path}: tensor {name!r} has dtype {entry.dtype}, expected F16, BF16, F32 or F64"
            )

        def load(entry=entry) -> np.ndarray:
            if entry.nbytes == 0:
                return np.zeros(entry.shape, dtype=np.float32)
            raw = np.memmap(
                entry.file, dtype=np.uint8, mode="r", offset=entry.start, shape=(entry.nbytes,)
            )
            values = np.asarray(raw).view(dtypes[entry.dtype])
            if entry.dtype == "BF16":
                values = (values.astype(np.uint32) << 16).view(np.float32)
            return np.array(values.reshape(entry.shape), dtype=np.float32)

        found[name] = (tuple(entry.shape), load)
    return found


def index_dump(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], Loader]]:
    """name → (shape, loader) for every tensor of a dump: a directory of .npy / .npz /
    .safetensors files, or one such file. `.npy` files are named by their path below the
    directory without the suffix (`/` between folders); a name found twice is an error."""
    root = Path(path)
    if not root.exists():
        raise FormatError(f"{root}: no such dump file or directory")
    files: list[Path] = []
    if root.is_dir():
        for current, dirs, names in os.walk(root):
            depth = len(Path(current).relative_to(root).parts)
            if depth >= MAX_DEPTH:
                dirs.clear()
            dirs.sort()
            for name in sorted(names):
                files.append(Path(current) / name)
                if len(files) > MAX_FILES:
                    raise FormatError(f"{root}: more than {MAX_FILES} files")
    else:
        files = [root]
    index: dict[str, tuple[tuple[int, ...], Loader]] = {}
    origin: dict[str, Path] = {}

    def add(name: str, entry: tuple[tuple[int, ...], Loader], file: Path) -> None:
        if name in index:
            raise FormatError(f"{file}: tensor {name!r} is also in {origin[name]}")
        index[name], origin[name] = entry, file

    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".npy":
            base = root if root.is_dir() else file.parent
            name = file.relative_to(base).with_suffix("").as_posix()
            add(name, _npy_loader(file), file)
        elif suffix == ".npz":
            for name, entry in _npz_loaders(file).items():
                add(name, entry, file)
        elif suffix == ".safetensors":
            for name, entry in _safetensors_loaders(file).items():
                add(name, entry, file)
    if not index:
        raise FormatError(f"{root}: no .npy, .npz or .safetensors tensors")
    return index
