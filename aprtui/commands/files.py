"""`apr-tui files DIR`: browse a directory of APRT stage files."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "browse a directory of APRT stage files (header, statistics, values; diff two)"

DESCRIPTION = """\
A tree of the trace directory's layer-N/ directories and stage files (whole-model stages at the
root). Highlight a file for its header (layer, dim_product, size), statistics and first values;
mark two with space and press d to diff them with `apr diff --values` semantics."""

EPILOG = """\
examples:
  apr-tui files model-trace/"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", help="a trace directory (apr trace --save-tensor)"
    )


def run(args: argparse.Namespace) -> int:
    from aprtui.app import FilesApp
    from engine.aprt import read_trace_dir

    directory = Path(args.directory)
    read_trace_dir(directory, strict=False)  # a missing or empty directory fails here, as one line
    return int(FilesApp(directory).run() or 0)
