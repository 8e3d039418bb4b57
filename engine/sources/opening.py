"""Opening the two sides of a comparison from what the user typed.

A path is a trace directory (`looks_like_trace_dir`) or a model file; a model side gets its
token ids here: explicit `--tokens`, else `--prompt` (default apr's "What is 2+2?") encoded by its
own tokenizer (or the other model's), else a directory's tokens.json. Which tokens the pair
finally traces is settled by `engine.plan.prepare`.
"""

from __future__ import annotations

from pathlib import Path

from engine.backend import Backend, resolve_backend
from engine.model import Model
from engine.sources.base import TraceSource
from engine.sources.model_run import ModelSource
from engine.sources.trace_dir import DirectorySource, looks_like_trace_dir


def open_source(
    spec: str | Path,
    *,
    prompt: str | None = None,
    token_ids: list[int] | None = None,
    device: str | Backend = "auto",
) -> TraceSource:
    """A model file / HF directory as a ModelSource, or an APRT directory as a DirectorySource.

    For a model: explicit `token_ids` win, else `prompt` (default apr's "What is 2+2?") is
    encoded with the model's own tokenizer, as apr does (no chat template).
    """
    a, _ = open_pair(spec, None, prompt=prompt, token_ids=token_ids, device=device)
    return a


def open_pair(
    spec_a: str | Path,
    spec_b: str | Path | None,
    *,
    prompt: str | None = None,
    token_ids: list[int] | None = None,
    device: str | Backend = "auto",
) -> tuple[TraceSource, TraceSource | None]:
    """Open both sides of a comparison and settle which tokens a model side traces.

    A side is another engine when it is one of `engine.sources.specs`' specs (`llama.cpp`,
    `llama.cpp:PATH.gguf`, `hf:PATH`, `dump:PATH`; a bare `llama.cpp` runs the other side's GGUF),
    else a trace directory, else a model file.

    Token ids, by precedence: `token_ids`; `prompt` encoded by the model's tokenizer; a trace
    directory's tokens.json (checked again by `compare`); the default prompt encoded by the
    model's tokenizer, or by the other model's when this one carries none.
    """
    from engine.errors import TokenizerError
    from engine.formats import open_model
    from engine.sources.specs import open_spec
    from engine.tokenizer import DEFAULT_PROMPT, encode_prompt, same_prompt_encoding

    backend = resolve_backend(device)  # a bad --device fails before any model is opened
    specs = [spec_a] + ([spec_b] if spec_b is not None else [])
    opened: list[TraceSource | Model] = []
    both_files = len(specs) == 2 and all(_model_file(spec) for spec in specs)
    try:
        if both_files:
            opened.extend(open_two_models(Path(specs[0]), Path(specs[1])))
        else:
            for index, spec in enumerate(specs):
                other = specs[1 - index] if len(specs) == 2 else None
                engine_source = open_spec(
                    str(spec),
                    token_ids=token_ids,
                    prompt=prompt,
                    device=device
                    if isinstance(device, str)
                    else backend.name.replace("numpy", "cpu"),
                    model=other,
                )
                if engine_source is not None:
                    opened.append(engine_source)
                    continue
                path = Path(spec)
                opened.append(
                    DirectorySource(path) if looks_like_trace_dir(path) else open_model(path)
                )
        models = [m for m in opened if isinstance(m, Model)]
        encoded: list[tuple[Model, str, list[int]]] = []  # a model and its copy encode once

        def encode(encoder: Model, text: str) -> list[int]:
            for seen, seen_text, ids in encoded:
                if seen_text == text and same_prompt_encoding(seen, encoder):
                    return list(ids)
            ids = encode_prompt(encoder, text)
            encoded.append((encoder, text, ids))
            return ids

        sources: list[TraceSource] = []
        for item in opened:
            if not isinstance(item, Model):
                sources.append(item)
                continue
            if token_ids is not None:
                ids, used_prompt, explicit = list(token_ids), None, True
            else:
                used_prompt = prompt if prompt is not None else DEFAULT_PROMPT
                explicit = prompt is not None
                encoders = [item] + [m for m in models if m is not item and m.tokenizer]
                encoder = next((m for m in encoders if m.tokenizer is not None), item)
                try:
                    ids = encode(encoder, used_prompt)
                except TokenizerError:
                    if prompt is not None:  # the user's own prompt: never swap it silently
                        raise
                    directory_ids = next(
                        (
                            s.token_ids
                            for s in opened
                            if isinstance(s, DirectorySource) and s.token_ids
                        ),
                        None,
                    )
                    if directory_ids is None:
                        raise
                    ids, used_prompt, explicit = directory_ids, None, False
            sources.append(
                ModelSource(
                    item, ids, prompt=used_prompt, tokens_explicit=explicit, backend=backend
                )
            )
    except BaseException:
        for item in opened:
            item.close()
        raise
    return sources[0], (sources[1] if len(sources) > 1 else None)


def _model_file(spec: str | Path) -> bool:
    """Whether `spec` names a model file (neither an engine spec nor a trace directory); False
    also when looking raises, so the one-at-a-time path reports that error in its turn."""
    from engine.sources.specs import split_spec

    try:
        return split_spec(str(spec)) is None and not looks_like_trace_dir(Path(spec))
    except Exception:
        return False


def open_two_models(path_a: Path, path_b: Path) -> list[Model]:
    """Both model files of a comparison, opened at once: B on a helper thread while A opens on
    this one. Opening is mostly reading: an APR file's footer CRC (zlib, which releases the GIL)
    and page faults of the mapped headers overlap the other file's header parsing, so a bisect
    starts its passes sooner (SmolLM2's GGUF against its Q8_0 APR copy: 0.20 s → 0.15 s from
    opening to the first layer, on the 2-core development machine).

    Errors come out as when the files are opened one after the other: A's first; a model that
    did open is closed again. The helper runs in a copy of this thread's context, so what the
    caller set there (engine.progress' listener) holds for B's opening too.
    """
    import contextvars
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import suppress

    from engine.formats import open_model

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-b") as pool:
        opening_b = pool.submit(contextvars.copy_context().run, open_model, path_b)
        try:
            model_a = open_model(path_a)
        except BaseException:
            with suppress(BaseException):  # B's own error: A's is the one reported
                opening_b.result().close()
            raise
        try:
            model_b = opening_b.result()
        except BaseException:
            model_a.close()
            raise
    return [model_a, model_b]
