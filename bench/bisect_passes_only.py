"""`apr-tui bisect` running its two passes and nothing else (for trace_bench).

    python bench/bisect_passes_only.py bisect MODEL COPY --prompt TEXT

The same command line as `python -m aprtui`, with every part of the comparison switched off:
no statistics of either side or of their difference, no local error, no logit metrics. Each
cell is only its key and shape, so the report says nothing; what is left is the floor every
bisect of two models pays whatever it computes from them: the interpreter, the imports, opening
both models, tokenizing, and the two passes (decoding every weight of both models and running
both forwards). A benchmark helper only: the product never runs this way.
"""

from __future__ import annotations


def main() -> int:
    import aprtui.commands.bisect as bisect
    import engine.plan as plan
    from engine.compare import Cell

    def keys_only(capture_a, capture_b, *, seq_len=None, local=None) -> Cell:
        present = capture_a if capture_a is not None else capture_b
        return Cell(present.layer, present.stage, present.shape, None, None, None)

    plan.make_cell = keys_only
    plan.Plan._tracker = lambda self: None
    bisect.logits_block = lambda a, b, cells: (None, [])
    from aprtui.cli import entry

    return entry()  # the command line in sys.argv, as `python -m aprtui` reads it


if __name__ == "__main__":
    raise SystemExit(main())
