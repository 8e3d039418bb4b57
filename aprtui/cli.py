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
import importlib
import sys
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


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (never a traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _print_error(f"{self.prog}: {message} (see --help)")
        raise SystemExit(EXIT_USAGE)


def _print_error(message: str) -> None:
    if sys.stderr.isatty():
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


def _top_help() -> str:
    explore = _load(EXPLORE)
    lines = [
        f"apr-tui {__version__}: find where two LLM inference paths start to disagree.",
        "",
        "usage: apr-tui MODEL [--ref REF] [--prompt TEXT | --tokens IDS] [--layers START..END]",
        "                     [--device {auto,cpu,cuda}]",
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


def main(argv: list[str] | None = None) -> int:
    from engine.errors import AprTuiError

    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if args_list else EXIT_USAGE
    if args_list[0] in ("-V", "--version"):
        print(f"apr-tui {__version__}")
        return 0

    if args_list[0] in COMMANDS:
        name = args_list.pop(0)
        module = _load(COMMANDS[name])
        prog = f"apr-tui {name}"
    else:
        module = _load(EXPLORE)
        prog = "apr-tui"
    parser = _build_parser(prog, module)
    args = parser.parse_args(args_list)
    try:
        return int(module.run(args) or 0)
    except AprTuiError as error:
        _print_error(str(error))
        return EXIT_USAGE
    except FileNotFoundError as error:
        _print_error(f"{error.filename}: no such file or directory")
        return EXIT_USAGE
    except IsADirectoryError as error:
        _print_error(f"{error.filename}: is a directory, expected a file")
        return EXIT_USAGE
    except PermissionError as error:
        _print_error(f"{error.filename}: permission denied")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("apr-tui: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
