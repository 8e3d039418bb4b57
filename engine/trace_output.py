"""One run's hold on a trace directory: created if needed, locked, cleaned up on failure.

`apr-tui trace` writes many files into one directory, and a trace directory is only useful when
its stage files and its tokens.json come from the same run. `TraceOutput` makes that so:

* the directory (and any missing parents) is created one level at a time, remembering which
  levels this run created;
* an exclusive lock on it is held for the whole run (engine.fileio.locked_directory), so a
  second apr-tui run into the same directory fails at once instead of mixing its files in;
* when the run fails (a full disk, a model error halfway), the files this run wrote are
  removed *if the directory is new* (nothing half-made is left where nothing was before), and
  every directory this run created that is empty again is removed. Nothing this run did not
  write is ever deleted, and directories are only ever removed with rmdir (empty ones).
* An interrupt (Ctrl+C, SIGTERM) keeps what was written: the files are whole, tokens.json says
  `"complete": false`, and a reader is told the directory is partial.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

from engine.fileio import locked_directory


class TraceOutput:
    """Context manager for writing one trace directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.created: list[Path] = []
        """Directories this run created, outermost first."""
        self.written: list[Path] = []
        """Files this run published (stage files, tokens.json)."""
        self._lock = None

    @property
    def is_new(self) -> bool:
        """Whether this run created the directory itself."""
        return self.directory in self.created

    def mkdir(self, path: Path) -> None:
        """Create `path` and its missing parents, remembering the levels created here."""
        missing = []
        for level in [path, *path.parents]:
            if level.exists():
                break
            missing.append(level)
        for level in reversed(missing):
            try:
                os.mkdir(level)
            except FileExistsError:
                continue  # another process made it first: not ours to remove
            self.created.append(level)

    def record(self, path: Path) -> Path:
        self.written.append(path)
        return path

    def __enter__(self) -> TraceOutput:
        self.mkdir(self.directory)
        lock = locked_directory(self.directory)
        # On failure nothing is removed: the run holding the lock may be about to write into
        # the directory we just created, and removing it would pull it from under that run.
        lock.__enter__()
        self._lock = lock
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if error is not None:
                interrupted = not isinstance(error, Exception)  # Ctrl+C, SIGTERM: keep, marked
                if self.is_new and not interrupted:
                    for path in reversed(self.written):
                        with contextlib.suppress(OSError):
                            path.unlink(missing_ok=True)
                self._remove_empty_created()
        finally:
            if self._lock is not None:
                self._lock.__exit__(None, None, None)
                self._lock = None

    def _remove_empty_created(self) -> None:
        """rmdir every directory this run created that holds nothing now, innermost first."""
        for level in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                os.rmdir(level)
