"""`apr-tui files DIR`: browse a directory of APRT stage files."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "browse one or two directories of APRT stage files (header, statistics, values; diff two)"

DESCRIPTION = """\
A tree of each trace directory's layer-N/ directories and stage files (whole-model stages at
the root; with two directories, under A: and B:). Highlight a file for its header (layer,
dim_product, size), statistics and first values; mark two files with space (A, then B) and
press d to diff them with `apr diff --values` numbers: any two files of the same size, across
layers and across the two directories."""

EPILOG = """\
examples:
  apr-tui files model-trace/
  apr-tui files model-trace/ hf-trace/         side by side: diff a stage of one with the other"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", help="a trace directory (apr trace --save-tensor)"
    )
    parser.add_argument(
        "other", metavar="DIR2", nargs="?", help="a second trace directory, shown beside DIR"
    )


def run(args: argparse.Namespace) -> int:
    from aprtui.app import FilesApp
    from aprtui.commands.explore import require_terminal
    from engine.trace_directory import read_trace_dir

    directories = [Path(args.directory)]
    if args.other is not None:
        directories.append(Path(args.other))
    for directory in directories:  # a missing or empty directory fails here, as one line
        read_trace_dir(directory, strict=False)
    require_terminal("apr-tui files")
    return int(FilesApp(directories).run() or 0)
