"""Fixtures for the hostile-input and concurrent-writer tests (issue 11): small real model files
written by our own writers, the real `apr-tui` in a subprocess, and byte-level helpers that
locate the fields a test corrupts."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

DIMS = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class Files:
    apr: Path
    gguf: Path
    hf_dir: Path


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    from engine.formats import apr, gguf, safetensors
    from engine.synth import synthesize

    root = tmp_path_factory.mktemp("hostile-models")
    model = synthesize("llama", seed=3, **DIMS)
    return Files(
        apr=Path(apr.write(model, root / "m.apr", "f32")),
        gguf=Path(gguf.write(model, root / "m.gguf", "f32")),
        hf_dir=Path(safetensors.write(model, root / "hf")),
    )


def run_cli(apr_tui: list[str], *args: object, timeout: float = 60, **kwargs):
    """`apr-tui ARGS` in a subprocess; the timeout turns a hang into a failure."""
    argv = [*apr_tui, *(a if isinstance(a, bytes) else os.fspath(a) for a in args)]
    return subprocess.run(argv, capture_output=True, timeout=timeout, **kwargs)


def one_line_error(result: subprocess.CompletedProcess, *needles: str | bytes) -> str:
    """Exit 2, no traceback, exactly one stderr line containing every needle; the line."""
    stderr = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    assert result.returncode == 2, (result.returncode, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "\x1b" not in lines[0] and "\r" not in lines[0], repr(lines[0])
    for needle in needles:
        text = needle if isinstance(needle, str) else needle.decode()
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- APR bytes


def apr_index_entries(data: bytes) -> dict[str, dict[str, int]]:
    """name -> byte positions of an APR index entry's dtype, offset and size fields, and their
    values (layout of §4.4: u16 name length, name, u8 dtype, u8 ndim, u64 dims, u64 offset,
    u64 size)."""
    count = struct.unpack_from("<I", data, 8)[0]
    pos = struct.unpack_from("<Q", data, 24)[0]
    entries = {}
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2 : pos + 2 + name_len].decode()
        pos += 2 + name_len
        dtype_at = pos
        ndim = data[pos + 1]
        pos += 2 + 8 * ndim
        offset_at = pos
        offset, size = struct.unpack_from("<QQ", data, pos)
        pos += 16
        entries[name] = dict(
            dtype_at=dtype_at, offset_at=offset_at, offset=offset, size=size, dtype=data[dtype_at]
        )
    return entries


def fix_apr_footer(data: bytearray) -> bytearray:
    """Recompute the trailing CRC32, so that a test's edit reaches the check it is about."""
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    return data


# ----------------------------------------------------------------------------- GGUF bytes


def gguf_tensor_fields(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of the type and offset fields of tensor `name`'s info in a GGUF file."""
    raw = name.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    pos = at + 8 + len(raw)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    pos += 4 + 8 * n_dims
    type_at = pos
    offset_at = pos + 4
    return dict(
        type_at=type_at,
        offset_at=offset_at,
        type=struct.unpack_from("<I", data, type_at)[0],
        offset=struct.unpack_from("<Q", data, offset_at)[0],
    )
