"""Defensive file plumbing shared by every reader and writer of the engine.

Hazards that each format module would otherwise handle (or forget) on its own:

* Opening a FIFO, a terminal or a character device by mistake blocks forever or never ends;
  `open_regular` opens without blocking and refuses anything but a regular file.
* `json.loads` on hostile text raises more than `JSONDecodeError`: `RecursionError` for deep
  nesting (`[[[[...`) and a plain `ValueError` for an integer literal over Python's 4300-digit
  limit. `loads_json` turns both into a `JSONDecodeError`, so a caller's one `except` clause
  covers every malformed document.
* Writing. `atomic_output` writes to a hidden temporary beside the target and publishes it only
  when the write succeeded, so the target is either untouched or complete:
  - the temporary is created with 0666 less the umask (what a plain `open(path, "w")` gives;
    `tempfile.mkstemp`'s 0600 would make a converted model unreadable by the user's group);
  - its name is short and fixed-length (`.apr-tui.<pid>.<8 hex>.tmp`), so a target name near
    NAME_MAX still gets a temporary;
  - the writer holds an `flock` on it for its whole life, so any later run can tell a temporary
    whose writer died (SIGKILL, power loss) from one being written, and removes the former
    (`remove_stale_temporaries`, run once per directory per process before the first write);
  - publication is a rename over the target only when replacing is allowed; otherwise it is a
    hard link, which fails if the name exists: a file that appeared at the target while we
    wrote (another process, a concurrent apr-tui) is never replaced, and of two concurrent
    writers of one new name exactly one wins;
  - an OSError of the write (ENOSPC, EDQUOT, EIO) is re-raised naming the target, not the
    temporary, and the temporary is removed.
  `atomic_file` (the trace's stage files) goes one better where Linux allows: its temporary
  has no name at all (O_TMPFILE) until it is linked to the target, with the same never-replace
  rule, so there is nothing to lock, sweep or remove (`_anonymous`).
* `locked_directory` holds an exclusive `flock` on a directory, so that one run at a time
  writes a trace directory's stage files and its tokens.json.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from engine.errors import OutputError

try:  # POSIX; elsewhere temporaries are not locked and stale ones are left alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_PREFIX = ".apr-tui."
TEMP_NAME = re.compile(r"\.apr-tui\.[0-9]+\.[0-9a-f]{8}\.tmp", re.ASCII)
"""The temporaries `atomic_output` creates: hidden, 25-34 bytes whatever the target's name."""

ANY_TEMP_NAME = re.compile(r"\..+\.[0-9]+\.[0-9a-f]{8}\.tmp", re.ASCII)
"""What readers of a trace directory skip: our temporaries, and the longer
`.<target name>.<pid>.<8 hex>.tmp` of earlier versions (TEMP_NAME is a special case of it)."""

_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
"""os.link failures that mean "this file system has no hard links" (FAT, some FUSE mounts)."""


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


class OutputExistsError(OutputError):
    """A target that appeared while we wrote it, and replacing was not allowed."""

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.path = os.fspath(target)
        super().__init__(
            f"{self.path}: appeared while apr-tui was writing it (another process created it); "
            "not replaced, pass --force to replace it"
        )


def _lock(fd: int, *, wait: bool = False) -> bool:
    """An exclusive flock on `fd`; False when another open file description holds one."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock (some network mounts): nothing to rely on
        return True
    return True


_SWEPT: set[str] = set()


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove every temporary of ours in `directory` whose writer is gone; return them.

    A temporary's writer holds an flock on it until it publishes or removes it, and the kernel
    drops that lock when the process dies however it dies. So a temporary we can lock has no
    writer: it is what a SIGKILLed run left. The inode is checked again under the lock, so a
    name reused in between is never removed. Nothing but our own TEMP_NAME pattern is touched.
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not TEMP_NAME.fullmatch(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if (
                _lock(fd)
                and os.stat(entry.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            ):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _sweep_once(directory: str) -> None:
    key = os.path.abspath(directory)
    if key not in _SWEPT:
        _SWEPT.add(key)
        remove_stale_temporaries(directory)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (delivered right after it).

    Between `os.open` creating the temporary and the caller holding its name, an exception
    raised by a signal handler would leave a temporary nobody removes; a test that sends SIGTERM
    the moment the temporary appears hits exactly that instant.
    """
    import signal
    import threading

    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield  # Python runs handlers in the main thread only: nothing to defer elsewhere
        return
    previous = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


def _temporary_name(directory: str) -> str:
    """A fresh TEMP_NAME in `directory` (random: two writers never draw the same one)."""
    return os.path.join(  # secrets: +10 ms of imports
        directory, f"{TEMP_PREFIX}{os.getpid()}.{os.urandom(4).hex()}.tmp"
    )


def _create_temporary(directory: str) -> tuple[int, str]:
    """A new, locked, empty temporary in `directory`: (descriptor holding the lock, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        temp = _temporary_name(directory)
        try:
            fd = os.open(temp, flags, 0o666)
        except FileExistsError:
            continue  # a name collision: draw another
        try:
            _lock(fd, wait=True)
            # A sweeper that locked the file in the instant before we did has removed it.
            if os.stat(temp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd, temp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            with suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        os.close(fd)


def _publish(temp: str, target: str, overwrite: bool) -> None:
    """Move the finished temporary to `target`: a rename when replacing is allowed, otherwise
    a hard link that fails if `target` exists (then the temporary is dropped)."""
    if overwrite:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)
    except FileExistsError:
        raise OutputExistsError(target) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: claim the name exclusively, then rename over our own claim.
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise OutputExistsError(target) from None
        os.replace(temp, target)
        return
    os.unlink(temp)


def _naming(error: OSError, target: str, temp: str | None) -> OSError:
    """`error` with the target as its file name (the user never asked for the temporary; one
    that could not even be created has no `temp` yet, but its name says what it is)."""
    name = None if error.filename is None else os.fspath(error.filename)
    ours = (os.fspath(temp) if temp is not None else None, os.fspath(target))
    if name is not None and name not in ours and not _our_temporary(name, target):
        return error  # about another file (a read of the input, say): leave it as it is
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno is None:  # numpy's "10752 requested and 4093 written": a short write
        return OSError(errno.EIO, f"write failed: {reason}", os.fspath(target))
    return OSError(error.errno, reason, os.fspath(target))


def _our_temporary(name: str, target: str) -> bool:
    """Whether `name` is a temporary of ours beside `target` (TEMP_NAME, same directory)."""
    same_directory = (os.path.dirname(name) or os.curdir) == (os.path.dirname(target) or os.curdir)
    return same_directory and TEMP_NAME.fullmatch(os.path.basename(name)) is not None


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """A new hidden temporary file beside `path`, published as `path` if the block succeeds.

    With `overwrite=False` an existing `path` is never replaced: if one appeared while the
    block ran, OutputExistsError is raised and the temporary removed. On any exception
    (including KeyboardInterrupt and aprtui's SIGTERM exception) the temporary is removed, so
    `path` is either untouched or completely written. An OSError names `path`.
    """
    with _atomic(path, overwrite) as (_, temp):
        yield Path(temp)


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[BinaryIO]:
    """`atomic_output` with the temporary open for writing: a binary file on the temporary's
    descriptor, so no second open (a trace writes hundreds of files, and an open costs ~0.1 ms
    on some file systems). Flushed before the file is published.

    The temporary has no name at all where the file system allows (`_anonymous`): nothing to
    lock, sweep or remove, and no half-written file is ever visible, even to `ls`."""
    with _anonymous(path, overwrite) as (fd, _), open(fd, "wb", closefd=False) as handle:
        yield handle


ANONYMOUS_TEMPORARIES = True
"""Whether `atomic_file` writes into an unnamed file (Linux O_TMPFILE) and links it to its
name when complete, where the file system supports it. Measured, 483 SmolLM2-sized stage files
on tmpfs, min of 5: 17-24 ms against 43-54 ms through a named, locked temporary (an open, a
lock, two stats, a link and an unlink each): ~30 ms of a 0.85 s trace."""

_NO_ANONYMOUS: set[str] = set()
"""Directories where O_TMPFILE or the link from /proc failed as unsupported: named from then on."""

_PROC_FD: list = [None, -1]
"""[pid, descriptor of /proc/self/fd] (opened once per process; -1 where there is none)."""

_PROC_LOCK = threading.Lock()
"""Guards _PROC_FD: a trace's writer thread and its pass may publish files at once."""


def _target(path: str | os.PathLike[str]) -> str:
    """The target as `Path` spells it (what error messages name)."""
    return os.fspath(path if isinstance(path, PurePath) else Path(path))


def _proc_fd() -> int:
    """A descriptor of this process's /proc/self/fd: `linkat` through it gives an unnamed
    file its name. Reopened after a fork (the parent's would name the parent's files)."""
    with _PROC_LOCK:
        if _PROC_FD[0] != os.getpid():
            try:
                flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
                fd = os.open("/proc/self/fd", flags)
            except OSError:
                fd = -1
            _PROC_FD[:] = [os.getpid(), fd]
        return _PROC_FD[1]


def _anonymous_allowed(parent: str) -> bool:
    return (
        ANONYMOUS_TEMPORARIES
        and hasattr(os, "O_TMPFILE")
        and parent not in _NO_ANONYMOUS
        and _proc_fd() >= 0
    )


_NO_TMPFILE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL}
"""open(O_TMPFILE) failures that mean "not on this file system or kernel" (EISDIR: a kernel
older than O_TMPFILE, which sees only its O_DIRECTORY)."""

_NO_LINK_FROM_PROC = _NO_HARD_LINKS | {errno.ENOENT, errno.EACCES, errno.EXDEV}
"""linkat failures through /proc/self/fd that mean "this way of naming a file is not
available here" (no hard links, a restricted /proc): the content is copied out instead."""


@contextmanager
def _anonymous(path: str | os.PathLike[str], overwrite: bool) -> Iterator[tuple[int, None]]:
    """`_atomic` with an unnamed temporary: yields (its descriptor, None), then links it to the
    target, which fails if the target exists (so a file that appeared meanwhile is never
    replaced) unless replacing is allowed. Where unnamed files are off or unsupported
    (`_anonymous_allowed`, or O_TMPFILE refused), `_atomic`'s named temporary is used instead."""
    target = _target(path)
    parent = os.path.dirname(target) or os.curdir
    fd = -1
    if _anonymous_allowed(parent):
        _sweep_once(parent)  # stale named temporaries (an earlier version, a replacement)
        flags = os.O_RDWR | os.O_TMPFILE | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(parent, flags, 0o666)
        except OSError as error:
            if error.errno not in _NO_TMPFILE:
                raise _naming(error, target, None) from None
            _NO_ANONYMOUS.add(parent)
    if fd < 0:
        with _atomic(target, overwrite) as opened:
            yield opened
        return
    try:
        yield fd, None
        _publish_anonymous(fd, target, parent, overwrite)
    except OSError as error:
        raise _naming(error, target, None) from None
    finally:
        os.close(fd)


def _link_anonymous(fd: int, name: str) -> None:
    """Give the unnamed file `fd` the name `name` (FileExistsError if it is taken)."""
    os.link(str(fd), name, src_dir_fd=_proc_fd(), follow_symlinks=True)


def _publish_anonymous(fd: int, target: str, parent: str, overwrite: bool) -> None:
    try:
        _link_anonymous(fd, target)
        return
    except FileExistsError:
        if not overwrite:
            raise OutputExistsError(target) from None
    except OSError as error:
        if error.errno not in _NO_LINK_FROM_PROC:
            raise
        _NO_ANONYMOUS.add(parent)
        _copy_out(fd, target, overwrite)
        return
    # Replacing an existing target: a name of our own first (locked, as every temporary of
    # ours is, so no sweeper takes it), then one rename over the target.
    _lock(fd, wait=True)
    while True:
        temp = _temporary_name(parent)
        try:
            _link_anonymous(fd, temp)
            break
        except FileExistsError:
            continue
    try:
        os.replace(temp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise


def _copy_out(fd: int, target: str, overwrite: bool) -> None:
    """Publish the unnamed file's content through a named temporary (`_atomic`)."""
    size = os.fstat(fd).st_size
    with _atomic(target, overwrite) as (out, _):
        offset = 0
        while offset < size:
            sent = os.sendfile(out, fd, offset, size - offset)
            if sent == 0:
                raise OSError(errno.EIO, "the temporary shrank while it was copied", target)
            offset += sent


@contextmanager
def _atomic(path: str | os.PathLike[str], overwrite: bool) -> Iterator[tuple[int, str]]:
    """The body of `atomic_output`: yields (the temporary's locked descriptor, its path).

    Paths are handled as strings: a trace publishes hundreds of files, and pathlib's parsing
    cost more than the system calls. The target is spelled as `Path` spells it (what error
    messages name), parsed only when it is not a Path already."""
    target = _target(path)
    parent = os.path.dirname(target) or os.curdir
    _sweep_once(parent)
    temp: str | None = None
    fd = -1
    try:
        with _signals_deferred():
            fd, temp = _create_temporary(parent)
        yield fd, temp
        _publish(temp, target, overwrite)
    except BaseException as error:
        if temp is not None:
            with suppress(OSError):
                os.unlink(temp)
        if isinstance(error, OSError):
            raise _naming(error, target, temp) from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)


@contextmanager
def locked_directory(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive flock on the directory `path` for the block, or raise OutputError at
    once when another process holds it (two runs writing one trace directory would mix their
    files). On a file system without flock the block runs unlocked."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not _lock(fd):
            raise OutputError(
                f"{os.fspath(path)}: another apr-tui run is writing into this directory; "
                "wait for it to finish or choose another directory"
            )
        yield
    finally:
        os.close(fd)
