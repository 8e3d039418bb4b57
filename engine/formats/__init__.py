"""Model containers. `open_model(path)` dispatches on the file; each module yields a `Model`.

The file's first bytes decide (`GGUF`, `APR\\0` / `APR2`); the extension only breaks ties for
formats without a magic (safetensors starts with a length). A directory is an HF checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import FormatError
from engine.fileio import open_regular
from engine.model import Model

__all__ = ["open_model", "detect_format"]


def detect_format(path: Path) -> str:
    """`apr`, `gguf` or `safetensors` for `path`, or a one-line error saying why not."""
    if path.is_dir():
        return "safetensors"
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    try:
        with open_regular(path) as handle:
            magic = handle.read(4)
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror or error}") from None
    if magic == b"GGUF":
        return "gguf"
    if magic[:3] == b"APR":
        return "apr"  # the APR reader names the variant (APR1, legacy) it refuses
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".gguf", ".apr"):
        raise FormatError(f"{path}: wrong magic {magic!r} for a {suffix} file")
    raise FormatError(
        f"{path}: unrecognized model file (magic {magic!r}); expected .apr, .gguf, .safetensors "
        "or an HF checkpoint directory"
    )


def open_model(path: Path | str) -> Model:
    """Open any supported model file (or HF directory) as a lazily loaded `Model`."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "gguf":
        from engine.formats.gguf import open_gguf

        return open_gguf(path)
    if kind == "apr":
        from engine.formats.apr import open_apr

        return open_apr(path)
    from engine.formats.safetensors import open_safetensors

    return open_safetensors(path)
