"""`apr-tui trace` with every weight decoded by the pass itself (for trace_bench).

    python bench/trace_one_process.py trace MODEL --save-tensor all ...

The same command line as `python -m aprtui`, with engine.prefetch's decoding child switched
off: what the trace costs on one process, beside the same trace with the child, so that the
benchmark shows what the child buys. A benchmark helper only: the product never runs this way
(it forks the child itself when a core is idle).
"""

from __future__ import annotations


def main() -> int:
    import engine.prefetch as prefetch

    prefetch.DECODE_PROCESS = False
    from aprtui.cli import entry

    return entry()  # the command line in sys.argv, as `python -m aprtui` reads it


if __name__ == "__main__":
    raise SystemExit(main())
