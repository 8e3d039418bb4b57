"""`apr-tui convert IN OUT.apr`: any supported model file to APR v2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

WRITES_FILES = True
SHOWS_STEP_PROGRESS = True
"""Long engine steps (a big APR file's footer check) show progress on stderr (aprtui.cli)."""
"""SIGTERM cleans up this command's temporaries (aprtui.cli.Terminated)."""

HELP = "convert a .gguf / .safetensors / .apr model (or HF directory) to APR v2"

DESCRIPTION = """\
Convert a model to an APR v2 file that `apr` can load: HF tensor names in HF row order (GGUF
Llama Q/K rows are restored from llama.cpp's permuted order), tensors sorted by name and
aligned to 64 bytes, header and footer CRC32, the architecture in canonical metadata keys, and
the model's tokenizer embedded as tokenizer.vocabulary + tokenizer.merges.

Quantized inputs are dequantized and stored in --dtype: f32 (lossless for f32/f16/bf16
inputs), f16, q8_0 (GGML Q8_0 blocks), q4_k or q6_k (GGML K-quant blocks, rows padded to 256
columns as apr's own quantizer does). Norms and biases always stay f32."""

EPILOG = """\
examples:
  apr-tui convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2.apr
  apr-tui convert ./qwen2-0.5b/ qwen2.apr --dtype q8_0
  apr-tui convert model.apr model-f16.apr --dtype f16 --force

exit codes: 0 written, 2 bad input (unreadable model, existing OUT without --force, ...)."""

DTYPES = ("f32", "f16", "q8_0", "q4_k", "q6_k")

OTHER_FORMAT_SUFFIXES = {
    ".gguf": "GGUF",
    ".safetensors": "safetensors",
    ".ggml": "GGML",
    ".pt": "PyTorch",
    ".pth": "PyTorch",
    ".onnx": "ONNX",
    ".npz": "numpy",
    ".npy": "numpy",
}
"""OUT names that promise another format: an APR file written there would be opened by the
wrong tool (and by us, by its magic, without complaint), so `convert` refuses them."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        metavar="IN",
        help="model file (.gguf, .safetensors, .apr) or HF checkpoint directory",
    )
    parser.add_argument("output", metavar="OUT.apr", help="the APR v2 file to write")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="f32", help="storage type of the weights (default f32)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    from engine.errors import FormatError
    from engine.formats import apr, open_model

    for flag, text in (("IN", args.input), ("OUT.apr", args.output)):
        if not text:
            raise FormatError(f"{flag}: empty path")
    source = Path(args.input)
    target = Path(args.output)
    promised = OTHER_FORMAT_SUFFIXES.get(target.suffix.lower())
    if promised is not None:
        raise FormatError(
            f"{target}: convert writes APR v2 files, and a {target.suffix} name promises a "
            f"{promised} file; name the output {target.with_suffix('.apr').name}"
        )
    if target.is_dir():
        raise FormatError(f"{target}: is a directory, expected an .apr file name")
    if target.exists() or target.is_symlink():
        if _same_file(source, target):
            raise FormatError(f"{target}: is the input file; write to another name")
        if target.exists() and not target.is_file():  # --force must not replace /dev/null
            raise FormatError(f"{target}: is not a regular file; refusing to replace it")
        if not args.force:
            raise FormatError(f"{target}: already exists; pass --force to replace it")
    if not target.parent.is_dir():
        raise FormatError(f"{target.parent}: output directory does not exist")

    started = time.monotonic()
    with open_model(source) as model:
        progress = _Progress(enabled=not args.quiet and (sys.stderr.isatty() or _big(model)))
        # Without --force, OUT is published only if it still does not exist: a file created
        # there meanwhile (another process, a concurrent convert) is never replaced.
        apr.write(model, target, args.dtype, progress=progress, overwrite=args.force)
        progress.done()
        config = model.config
        tokenizer_error = model.metadata.get("tokenizer_error") if model.tokenizer is None else None
    size = target.stat().st_size
    from engine.errors import printable

    print(
        f"wrote {printable(target)} ({_human(size)}, {args.dtype}): {config.architecture}, "
        f"{config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size} "
        f"in {time.monotonic() - started:.1f}s"
    )
    if tokenizer_error:  # the weights converted: say, as a warning, why prompts need --tokens
        sys.stderr.write(f"note: tokenizer not embedded: {printable(tokenizer_error)}\n")
    return 0


def _same_file(source: Path, target: Path) -> bool:
    """Whether `target` is `source` itself (also through a symlink or a hard link)."""
    try:
        return os.path.samefile(source, target)
    except OSError:  # one of them does not exist (or is a dangling link)
        return False


def _big(model) -> bool:
    """Worth a progress line: more than ~50M parameters."""
    total = 0
    for name in model.weights.names():
        count = 1
        for dim in model.weights.shape(name):
            count *= dim
        total += count
    return total > 50_000_000


class _Progress:
    """Conversion progress on stderr: one line rewritten in place on a terminal, otherwise a
    line at each quarter (so logs stay short)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.width = 0
        self.reported = 0

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        line = f"converting: {done}/{total} {name}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
        elif done * 4 // total > self.reported:
            self.reported = done * 4 // total
            sys.stderr.write(f"converting: {done}/{total} tensors ({self.reported * 25}%)\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
