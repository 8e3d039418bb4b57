"""Trace sources: the paths a comparison can put side by side.

Each module here produces stage captures in apr's layout (shared/reference/aprender-formats.md §5)
from one kind of inference path, behind the duck-typed `TraceSource` interface of
engine.compare: `llamacpp` runs llama.cpp's own graph, `hf` runs HF transformers, `tensor_dump`
reads another engine's dumped tensors through a name map, and `specs` turns a command-line
spec (`llama.cpp`, `hf:DIR`, `dump:DIR`) into one of them.
"""
