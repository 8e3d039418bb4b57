"""Trace sources: the paths a comparison can put side by side.

`TraceSource` (base) is the interface. `ModelSource` runs our forward pass over a model file,
`DirectorySource` reads a directory of APRT stage files, `llamacpp` runs llama.cpp's own graph,
`hf` runs HF transformers, `tensor_dump` reads another engine's dumped tensors through a name
map; `open_pair` opens both sides of a comparison from what the user typed. Every source yields
captures in apr's layout (shared/reference/aprender-formats.md §5).
"""

from engine.sources.base import TraceSource
from engine.sources.model_run import ModelSource
from engine.sources.opening import open_pair, open_source
from engine.sources.trace_dir import DirectorySource, logical_shape, looks_like_trace_dir

__all__ = [
    "DirectorySource",
    "ModelSource",
    "TraceSource",
    "logical_shape",
    "looks_like_trace_dir",
    "open_pair",
    "open_source",
]
