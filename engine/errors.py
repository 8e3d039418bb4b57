"""The engine's exception types, and the one escaping every error message goes through.

Every message is one line that names the file (or argument) and what is wrong with it, so the
command line can print it as it is and the app can show it as a notification.

Messages quote text the user or a file supplied: paths, flag values, metadata strings, tensor
names. Such text can hold a newline, a carriage return or an ANSI escape sequence (a file named
`$'a\\nb.gguf'`, `general.architecture = "llama\\n"`), which would break the one-line contract or
repaint the user's terminal. `printable` turns every control character into a visible escape
(`\\n`, `\\r`, `\\x1b`, `\\x9b`) and every undecodable byte of a path (Python's surrogateescape
code points, from a name that is not UTF-8) into `\\xNN`; `AprTuiError.__str__` applies it, and
the command line applies it again to whatever it prints (it is idempotent: backslashes are left
alone, so escaping twice changes nothing).
"""

from __future__ import annotations

import os
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
"""C0 and C1 controls, DEL, the Unicode line/paragraph separators (line breaks to some
terminals and to `str.splitlines`), and lone surrogates (undecodable bytes of a path)."""

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the original byte
        return f"\\x{code - 0xDC00:02x}"
    if code > 0xFF:
        return f"\\u{code:04x}"
    return f"\\x{code:02x}"


def printable(text: object) -> str:
    """`str(text)` with every control character, line separator and undecodable path byte
    shown as a visible escape: the result is one line and safe to write to a terminal."""
    return _CONTROL.sub(_escape, str(text))


def path_text(path: str | os.PathLike[str]) -> str:
    """A path as valid Unicode text for a file we write (JSON, APR metadata): undecodable bytes
    become `\\xNN` instead of lone surrogates, which no UTF-8 encoder accepts."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def path_display(path: str | os.PathLike[str]) -> str:
    """A path as Rust's `Path::display()` shows it, which is how apr's messages name files:
    undecodable bytes become U+FFFD (`path_text` keeps them as `\\xNN` for files we write)."""
    return os.fsencode(path).decode("utf-8", "replace")


class AprTuiError(Exception):
    """Base class of every error the engine raises on bad input."""

    def __str__(self) -> str:
        return printable(super().__str__())


class PlanError(AprTuiError):
    """A `--save-tensor` stage list or `--save-tensor-layers` range that apr would reject."""


class FormatError(AprTuiError):
    """A file whose bytes do not follow its format (truncated, bad magic, bad lengths, ...)."""


class UnsupportedModelError(AprTuiError):
    """A well-formed model file of an architecture, dtype or feature the engine does not support."""


class MissingTensorError(AprTuiError):
    """A model file that lacks a tensor the architecture needs."""


class TokenizerError(AprTuiError):
    """No usable tokenizer, or a prompt / token list that cannot be used."""


class DiffError(AprTuiError):
    """Two stage tensors (or traces) that cannot be compared element-wise."""


class TokenMismatchError(DiffError):
    """Two traces that were produced from different token sequences."""


class MissingPackageError(AprTuiError):
    """An optional package a feature needs is not installed; the message names what to install."""


class OutputError(AprTuiError):
    """A file or directory we were asked to write that cannot be written as asked: it appeared
    while we wrote (and --force was not given), or another apr-tui run is writing it."""
