"""`apr-tui bisect` doing only the work the issue-13 baseline's bisect did (for trace_bench).

    python bench/bisect_baseline_work.py bisect MODEL COPY --prompt TEXT

The same command line as `python -m aprtui`, with the two parts of a comparison that came
after that baseline switched off: the local error of every stage (a float64 recomputation of
the checked side, engine.local_error) and the per-position logit metrics. What is left, both
passes and every cell's statistics, is what the baseline computed, so the two times compare
like for like. A benchmark helper only: the product never runs this way.
"""

from __future__ import annotations


def main() -> int:
    import aprtui.commands.bisect as bisect
    import engine.plan as plan

    plan.Plan._tracker = lambda self: None  # no local error: no noise verdict either
    bisect.logits_block = lambda a, b, cells: (None, [])  # no per-position logit metrics
    from aprtui.cli import entry

    return entry()  # the command line in sys.argv, as `python -m aprtui` reads it


if __name__ == "__main__":
    raise SystemExit(main())
