"""Trace sources: the things a comparison's two sides can be.

`TraceSource` (base) is the interface; `ModelSource` runs our forward pass over a model file,
`DirectorySource` reads a directory of APRT stage files; `open_pair` opens both sides from what
the user typed.
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
