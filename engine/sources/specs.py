"""One entry point from a command-line spec to a trace source of another engine.

Accepted anywhere a model or a trace directory is (`--ref`, `bisect A B`, `compare`):

    llama.cpp                   the other side's GGUF run through llama.cpp
    llama.cpp:PATH.gguf         that GGUF run through llama.cpp
    hf:PATH                     an HF directory or a GGUF run by HF transformers
    dump:PATH                   a tensor dump (.npy / .npz / safetensors) read with a name map

Settings ride on the spec as a query, `?key=value&key=value`, or come in `settings` (the spec
wins): llama.cpp `n_threads`, `flash_attn` (0/1), `type_k`, `type_v`; hf `dtype` (float32 |
float16 | bfloat16); dump `map` (a built-in map, `hf` or `llama.cpp`, or a TOML/JSON file;
default: `name-map.toml` inside the dump directory if there is one, else `hf`). An unknown key
is an error, never ignored. Anything else is not a spec of ours: `open_spec` returns None and
the caller opens it as a model file or trace directory as before.

Token ids: the caller's `token_ids` win; otherwise `prompt` (default apr's) is encoded with our
tokenizer of the model file (the GGUF or HF directory), as apr does; a dump uses its own
tokens.json, else `token_ids`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from engine.errors import AprTuiError

ENGINES = ("llama.cpp", "hf", "dump")
"""Spec prefixes this module recognises."""

SETTING_KEYS: dict[str, dict[str, type]] = {
    "llama.cpp": {"n_threads": int, "flash_attn": bool, "type_k": str, "type_v": str},
    "hf": {"dtype": str},
    "dump": {"map": str},
}
"""Settings each engine accepts and their types."""

DEFAULT_MAP_FILE = "name-map.toml"
"""A dump directory's own name map, used when the spec names none."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def split_spec(spec: str) -> tuple[str, str | None, dict[str, str]] | None:
    """(engine, path or None, query settings) of one of our specs, or None for a plain path."""
    text = str(spec)
    if text == "llama.cpp" or text.startswith("llama.cpp?"):
        engine, rest = "llama.cpp", text[len("llama.cpp") :]
        rest = rest[1:] if rest.startswith("?") else rest
        return engine, None, _query(rest, text)
    for engine in ENGINES:
        prefix = f"{engine}:"
        if text.startswith(prefix):
            body = text[len(prefix) :]
            path, _, query = body.partition("?")
            if not path:
                raise AprTuiError(f"{text}: {engine}: needs a path after the colon")
            return engine, path, _query(query, text)
    return None


def _query(query: str, spec: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise AprTuiError(f"{spec}: settings must be ?key=value&key=value") from None
    return dict(pairs)


def _typed(engine: str, key: str, value: Any, spec: str) -> Any:
    kinds = SETTING_KEYS[engine]
    if key not in kinds:
        raise AprTuiError(f"{spec}: {engine} has no setting {key!r} (known: {', '.join(kinds)})")
    kind = kinds[key]
    if not isinstance(value, str):
        return value
    if kind is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise AprTuiError(f"{spec}: {key}={value}: expected 0 or 1")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise AprTuiError(f"{spec}: {key}={value}: expected an integer") from None
    return value


def _token_ids(
    model_path: Path, token_ids: list[int] | None, prompt: str | None
) -> tuple[list[int], str | None]:
    """The caller's ids, or the prompt encoded by our tokenizer of the model file."""
    if token_ids is not None:
        return list(token_ids), None
    from engine.formats import open_model
    from engine.tokenizer import DEFAULT_PROMPT, encode_prompt

    text = prompt if prompt is not None else DEFAULT_PROMPT
    with open_model(model_path) as model:
        return encode_prompt(model, text), text


def open_spec(
    spec: str | Path,
    *,
    token_ids: list[int] | None = None,
    prompt: str | None = None,
    device: str = "auto",
    settings: dict[str, Any] | None = None,
    model: str | Path | None = None,
) -> Any | None:
    """The TraceSource a spec names, or None when `spec` is a plain path (not ours).

    `model` is the other side's model file, which a bare `llama.cpp` runs. `device` applies to
    the HF source (`auto` and `cpu` → CPU; llama.cpp here is a CPU build).
    """
    parts = split_spec(str(spec))
    if parts is None:
        return None
    engine, path_text, query = parts
    merged = {key: _typed(engine, key, value, str(spec)) for key, value in (settings or {}).items()}
    merged.update({key: _typed(engine, key, value, str(spec)) for key, value in query.items()})
    if engine == "llama.cpp":
        from engine.sources.llamacpp import LlamaCppSource

        if path_text is None:
            if model is None or Path(model).suffix.lower() != ".gguf":
                raise AprTuiError(
                    f"{spec}: runs the other side's GGUF, and there is none here; "
                    "give llama.cpp:PATH.gguf"
                )
            path = Path(model)
        else:
            path = Path(path_text)
        ids, used_prompt = _token_ids(path, token_ids, prompt)
        return LlamaCppSource(path, ids, prompt=used_prompt, **merged)
    if engine == "hf":
        from engine.sources.hf import HfSource

        path = Path(path_text)
        torch_device = "cpu" if device in ("auto", "cpu") else device
        ids, used_prompt = _token_ids(path, token_ids, prompt)
        return HfSource(path, ids, prompt=used_prompt, device=torch_device, **merged)
    from engine.sources.tensor_dump import DumpSource

    path = Path(path_text)
    name_map = merged.get("map")
    if name_map is None:
        own = path / DEFAULT_MAP_FILE
        name_map = own if own.is_file() else "hf"
    return DumpSource(path, name_map, token_ids=token_ids)
