"""Defensive file plumbing shared by every reader and writer of the engine.

Three hazards that each format module would otherwise handle (or forget) on its own:

* Opening a FIFO, a terminal or a character device by mistake blocks forever or never ends;
  `open_regular` opens without blocking and refuses anything but a regular file.
* `json.loads` on hostile text raises more than `JSONDecodeError`: `RecursionError` for deep
  nesting (`[[[[...`) and a plain `ValueError` for an integer literal over Python's 4300-digit
  limit. `loads_json` turns both into a `JSONDecodeError`, so a caller's one `except` clause
  covers every malformed document.
* `tempfile.mkstemp` creates files with mode 0600, so a converted model would be unreadable by
  the user's group; `atomic_output` creates its temporary with 0666 less the umask (what a plain
  `open(path, "w")` gives) and renames it into place only when the write succeeded.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


class NotRegularFileError(OSError):
    """A path that exists but is a FIFO, socket or device rather than a regular file."""


class JsonLimitError(json.JSONDecodeError):
    """Valid-looking JSON beyond the parser's limits; there is no useful position to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "", 0)

    def __str__(self) -> str:
        return self.msg


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for binary reading; a directory or any non-regular file is an OSError.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the type is
    then checked on the open descriptor, so nothing can be swapped in between.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", os.fspath(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """All bytes of a regular file (see `open_regular`)."""
    with open_regular(path) as handle:
        return handle.read()


def loads_json(text: str | bytes) -> Any:
    """`json.loads`, with every kind of malformed input raised as `json.JSONDecodeError`."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except RecursionError:
        raise JsonLimitError("nested too deeply") from None
    except ValueError as error:  # e.g. an integer literal beyond sys.get_int_max_str_digits()
        raise JsonLimitError(str(error).split(":")[0]) from None


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new hidden temporary file beside `path`, renamed over `path` if the block succeeds.

    The temporary is `.<name>.<pid>.<8 hex>.tmp` (trace-directory readers skip that pattern), is
    created empty with mode 0666 less the umask, and is removed if the block raises, so `path`
    is either untouched or completely written.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # Created inside the try: an interrupt right after creation still removes it.
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield temp
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
