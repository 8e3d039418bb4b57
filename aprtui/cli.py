"""The `apr-tui` command line.

    apr-tui MODEL [--ref REF] ...      open the trace explorer (the default command)
    apr-tui demo                       the explorer on a built-in model pair with a planted defect
    apr-tui diff A B                   `apr diff --values` on two APRT files or trace directories
    apr-tui trace MODEL --save-tensor  write APRT stage files as `apr trace --save-tensor` does
    apr-tui bisect A B                 headless first-divergence report (exit 1 when diverged)
    apr-tui convert IN OUT.apr         any supported model file to APR v2
    apr-tui files DIR                  browse a directory of APRT stage files

Exit codes: 0 success (for bisect: nothing diverged), 1 divergence found, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from types import ModuleType

from aprtui import __version__

COMMANDS: dict[str, str] = {
    "demo": "aprtui.commands.demo",
    "diff": "aprtui.commands.diff",
    "trace": "aprtui.commands.trace",
    "bisect": "aprtui.commands.bisect",
    "convert": "aprtui.commands.convert",
    "files": "aprtui.commands.files",
}
EXPLORE = "aprtui.commands.explore"

EXIT_USAGE = 2
EXIT_TERMINATED = 128 + 15
"""The shell's status for a process ended by SIGTERM (128 + the signal's number; SIGHUP's is
129)."""

ENDING_SIGNALS = {"SIGTERM": "terminated", "SIGHUP": "hung up"}
"""The signals that end a command with its cleanup run, and what it says on the way out:
SIGTERM (`kill`, a service manager) and SIGHUP (the terminal closed, an ssh session dropped),
whose default action would leave a half-written temporary behind. SIGINT is Python's own
KeyboardInterrupt."""


class Terminated(BaseException):
    """An ending signal (ENDING_SIGNALS) as an exception, so that every `finally` and every
    writer's cleanup (the hidden temporary of `convert`, the half-made trace directory) runs
    before the process exits. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    """Raise Terminated once: a second ending signal (a closed terminal often sends SIGHUP
    twice, the kernel's and the shell's) is ignored, so it cannot cut the cleanup short."""
    import signal

    for name in ENDING_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is _raise_terminated:
            signal.signal(number, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def ending_signals_handled(handler, enabled: bool = True) -> Iterator[None]:
    """While the block runs, each of ENDING_SIGNALS calls `handler(signum, frame)`: main thread
    only, and only for a signal that still has its default action (one the caller chose to
    ignore, as `nohup` ignores SIGHUP, stays ignored); the default action is back afterwards.
    The commands that write files raise `Terminated` (`_raise_terminated`); the demo quits its
    explorer (aprtui.commands.demo)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    numbers = [getattr(signal, name) for name in ENDING_SIGNALS if hasattr(signal, name)]
    caught = [n for n in numbers if enabled and main and signal.getsignal(n) is signal.SIG_DFL]
    for number in caught:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number in caught:
            signal.signal(number, signal.SIG_DFL)  # also after _raise_terminated's SIG_IGN


def step_progress(module: ModuleType, args: argparse.Namespace) -> AbstractContextManager:
    """The engine's long steps (engine.progress) shown on stderr for the run, for a command
    that prints rather than runs a Textual screen (SHOWS_STEP_PROGRESS) and was not told to be
    quiet (convert's --quiet)."""
    if not getattr(module, "SHOWS_STEP_PROGRESS", False) or getattr(args, "quiet", False):
        return nullcontext()
    from aprtui.step_progress import StepProgress
    from engine.progress import listening

    return listening(StepProgress())


def name_writes_files(module: ModuleType) -> bool:
    """Whether a command module writes files (and so needs SIGTERM cleanup); the explorer and
    the demo leave signals to Textual."""
    return bool(getattr(module, "WRITES_FILES", False))


_NEGATIVE_NUMBER = re.compile(r"-[0-9]*\.?[0-9]+")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (never a traceback)."""

    _argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse checks required positionals before it reports unknown options, so
        # `apr-tui diff --bogus` would say "A, B are required"; name the bad flag instead.
        negative = self._negative_value(message)
        if negative is not None:
            message = negative
        unknown = self._unknown_options()
        if unknown and message.startswith("the following arguments are required"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
        _print_error(f"{self.prog}: {message} (see --help)")
        raise SystemExit(EXIT_USAGE)

    def _negative_value(self, message: str) -> str | None:
        """`--tokens -1,2`: argparse takes `-1,2` for an option and says "expected one
        argument"; say that the value is there and what is wrong with it."""
        match = re.fullmatch(r"argument (--[a-z-]+)(?:/[^:]*)?: expected one argument", message)
        if match is None:
            return None
        flag = match.group(1)
        words = self._argv
        for index, word in enumerate(words[:-1]):
            value = words[index + 1]
            if word == flag and re.fullmatch(r"-[0-9][0-9,.\s-]*", value):
                if flag == "--tokens":
                    return (
                        f"--tokens {value}: negative numbers are not token ids (ids are 0 or more)"
                    )
                return f"{flag} {value}: a negative value here is not allowed (write {flag}={value} if you mean it)"
        return None

    def _unknown_options(self) -> list[str]:
        """The option-like words of the command line that no option of this parser accepts."""
        known = self._option_string_actions
        unknown = []
        for word in self._argv:
            if word == "--":
                break
            if not word.startswith("-") or word == "-" or _NEGATIVE_NUMBER.fullmatch(word):
                continue
            name = word.split("=", 1)[0]
            if name in known or (not name.startswith("--") and name[:2] in known):
                continue  # an option, or a short option with its value attached (-n5)
            if name.startswith("--") and any(option.startswith(name) for option in known):
                continue  # an abbreviation argparse accepts
            unknown.append(word)
        return unknown


def _print_error(message: str) -> None:
    """`apr-tui: error: MESSAGE` as exactly one line: every control character, line break and
    undecodable path byte in MESSAGE (a file name, a flag value, a metadata string) is shown as
    a visible escape (engine.errors.printable), never sent to the terminal as it is."""
    from engine.errors import printable

    message = printable(message)
    if sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        sys.stderr.write(f"\x1b[31mapr-tui: error:\x1b[0m {message}\n")
    else:
        sys.stderr.write(f"apr-tui: error: {message}\n")


def _load(module_path: str) -> ModuleType:
    return importlib.import_module(module_path)


def _build_parser(prog: str, module: ModuleType) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=getattr(module, "DESCRIPTION", None) or module.HELP,
        epilog=getattr(module, "EPILOG", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser


def _usage_line() -> str:
    """The one-line usage printed when `apr-tui` is run with no arguments."""
    return (
        f"usage: apr-tui MODEL [--ref REF] [options] | apr-tui {{{','.join(COMMANDS)}}} [ARGS]"
        " (apr-tui --help for more)"
    )


def _top_help() -> str:
    explore = _load(EXPLORE)
    lines = [
        f"apr-tui {__version__}: find where two LLM inference paths start to disagree.",
        "",
        "usage: apr-tui MODEL [--ref REF] [--prompt TEXT | --tokens IDS] [--layers START..END]",
        "                     [--device {auto,cpu,cuda}] [--threshold X]",
        "       apr-tui COMMAND [ARGS]",
        "",
        f"  MODEL                {explore.HELP}",
        "",
        "commands:",
    ]
    for name, module_path in COMMANDS.items():
        lines.append(f"  {name:<20} {_load(module_path).HELP}")
    lines += [
        "",
        "Run `apr-tui COMMAND --help` for a command's options, `apr-tui MODEL --help` for the",
        "explorer's. Exit codes: 0 ok, 1 divergence found (bisect), 2 bad input or usage.",
    ]
    return "\n".join(lines)


MALLOC_ARENAS = 1
"""glibc malloc arenas the process may use. glibc gives every thread that allocates its own arena
(up to 8 per core) and keeps freed memory in each, so a comparison's threads (each side's pass,
the statistics, the local error) held ~160 MB more: a 512-token `bisect` of SmolLM2 against its
Q8_0 copy peaked at 1,093 MB RSS, 933 MB with one arena (991 MB with two), and a 37-token one
took 2.06-2.09 s either way (min of 5). Large arrays are mmapped by malloc in any case."""


def _limit_malloc_arenas() -> None:
    """mallopt(M_ARENA_MAX, MALLOC_ARENAS) where the C library is glibc; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # glibc only: musl has no mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # <malloc.h>
    mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(MALLOC_ARENAS))


def _defer_blas_threads() -> None:
    """Start OpenBLAS with one thread; the passes that gain from more ask for them.

    Loaded with numpy, OpenBLAS starts a thread per core at once, and they spin while the
    rest of numpy imports: ~0.14 s of CPU in every run on the 2-core machine (`python -c
    "import numpy"`, min of 3: 0.26-0.29 s CPU, 0.10-0.15 s with OPENBLAS_NUM_THREADS=1). Most
    runs never want a second BLAS thread (a short pass, a comparison's pipeline: engine.
    pipeline), and the ones that do raise the limit up to the count left in
    engine.pipeline.BLAS_THREADS_ENV. A user's own OPENBLAS_NUM_THREADS is left as it is, and
    so is a process that has imported numpy already (main() called in-process)."""
    from engine.pipeline import BLAS_THREADS_ENV, available_cores

    if "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ[BLAS_THREADS_ENV] = str(available_cores())


def entry() -> int:
    """The `apr-tui` command (and `python -m aprtui`): `main`, then the interpreter's exit
    without a cyclic garbage collection over everything the run left behind.

    At exit CPython runs the cyclic collector over every container still alive (a
    vocabulary's 10^5 strings in lists and dicts, the model's records, the modules): ~30 ms
    of a 0.9 s SmolLM2 trace on the development VM (whole process, interleaved runs: the
    last line of the run to the process's end 40-70 ms, 20-30 ms with the objects frozen).
    `gc.freeze` moves them out of the collector's sight; they are still freed by reference
    counting, files are closed and stdout is flushed as before. Only the command does this:
    `main` called in-process (the tests) leaves the collector alone."""
    import gc

    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    from engine.errors import AprTuiError

    _limit_malloc_arenas()
    _defer_blas_threads()

    args_list = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):  # a path the terminal cannot encode must not crash
        codecs.register_error(_ESCAPE, _json_escape)  # the report (PYTHONIOENCODING=ascii)
        sys.stdout.reconfigure(errors=_ESCAPE)
    if not args_list:  # a usage error: one usage line on stderr (the full help is --help's)
        sys.stderr.write(_usage_line() + "\n")
        return EXIT_USAGE
    if args_list[0] in ("-h", "--help", "help"):
        return _print_and_close(_top_help())
    if args_list[0] in ("-V", "--version"):
        return _print_and_close(f"apr-tui {__version__}")

    if args_list[0] in COMMANDS:
        name = args_list.pop(0)
        module = _load(COMMANDS[name])
        prog = f"apr-tui {name}"
    else:
        module = _load(EXPLORE)
        prog = "apr-tui"
    parser = _build_parser(prog, module)
    try:
        with (
            warnings.catch_warnings(),
            ending_signals_handled(_raise_terminated, name_writes_files(module)),
        ):
            # numpy's RuntimeWarnings (overflow, invalid value) print source lines on stderr;
            # every result they concern is checked where it matters (metadata is validated,
            # NaN/Inf in a capture are counted and flagged), so they only break the one-line
            # error contract.
            warnings.simplefilter("ignore", RuntimeWarning)
            args = parser.parse_args(args_list)
            with step_progress(module, args):
                return int(module.run(args) or 0)
    except Terminated as ended:
        import signal

        name = signal.Signals(ended.signum).name
        with suppress(OSError):  # a hung-up terminal may refuse the line (EIO): the status says it
            sys.stderr.write(f"apr-tui: {ENDING_SIGNALS.get(name, 'terminated')}\n")
        return 128 + ended.signum
    except AprTuiError as error:
        _print_error(str(error))
        return EXIT_USAGE
    except BrokenPipeError:
        _silence_stdout()
        return 0  # `apr-tui ... | head`: the reader left, nothing is wrong
    except OSError as error:
        _print_error(_describe_os_error(error))
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("apr-tui: interrupted\n")
        return 130
    except MemoryError as error:  # numpy's "Unable to allocate 13.4 GiB for an array ..."
        _print_error(f"out of memory: {error or 'allocation failed'}")
        return EXIT_USAGE


def _print_and_close(text: str) -> int:
    """Print help text; a reader that left early (`apr-tui -h | head -1`) is not an error."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return 0


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the interpreter's final flush
    does not print `Exception ignored ... BrokenPipeError` on stderr."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


_ESCAPE = "apr-tui-escape"


def _json_escape(error: UnicodeError) -> tuple[str, int]:
    """Characters the output encoding lacks as JSON `\\uXXXX` escapes (UTF-16 units), so that
    `--json` output stays valid JSON and text output stays readable."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    units = error.object[error.start : error.end].encode("utf-16-be", "surrogatepass")
    escaped = "".join(
        f"\\u{int.from_bytes(units[i : i + 2], 'big'):04x}" for i in range(0, len(units), 2)
    )
    return escaped, error.end


def _describe_os_error(error: OSError) -> str:
    """One line for a file-system error: the file first, then what went wrong."""
    reason = {
        FileNotFoundError: "no such file or directory",
        IsADirectoryError: "is a directory, expected a file",
        NotADirectoryError: "not a directory",
        PermissionError: "permission denied",
    }.get(type(error), (error.strerror or str(error)).lower())
    if error.filename is None:
        return reason
    return f"{error.filename}: {reason}"


if __name__ == "__main__":
    raise SystemExit(main())
