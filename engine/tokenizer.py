"""Prompt text to token ids, from the tokenizer a model file carries.

Every container stores its tokenizer the same way at heart: a vocabulary (index = id), a merge
list in rank order (byte-level BPE) or per-piece scores (SentencePiece-style, GGUF `llama`), and
a few special ids. `BpeTokenizer` keeps those parts; engine.bpe_backend builds a `tokenizers`
BPE from them, with the pre-tokenizer llama.cpp uses for the vocabulary's `pre` type, so a prompt
gives the ids `apr` and llama.cpp give: from only the tokens and merges the prompt can use when
encoding (the same ids, a tenth of the cost or less), from all of them for decoding. Control and
user-defined tokens are matched whole in the text, as llama.cpp does when it parses special
tokens. A `tokenizer.json` is encoded with its own pipeline.

`encode_prompt` follows `apr trace`: the prompt as it is, no chat template, and a BOS token only
when the model's metadata asks for one. `--tokens 1,2,3` bypasses the tokenizer entirely.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.bpe_backend import (
    DEFAULT_PRE,
    PRE_TOKENIZER_SPLITS,
    SPACE,
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_UNUSED,
    TOKEN_TYPE_USER_DEFINED,
    build_backend,
    prompt_backend,
    spm_merges,
)
from engine.errors import TokenizerError
from engine.fileio import loads_json

__all__ = [  # the vocabulary's facts live with the builders; re-exported for the formats
    "DEFAULT_PRE",
    "PRE_TOKENIZER_SPLITS",
    "SPACE",
    "TOKEN_TYPE_BYTE",
    "TOKEN_TYPE_CONTROL",
    "TOKEN_TYPE_NORMAL",
    "TOKEN_TYPE_UNKNOWN",
    "TOKEN_TYPE_UNUSED",
    "TOKEN_TYPE_USER_DEFINED",
    "BpeTokenizer",
    "spm_merges",
]

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HfTokenizer

    from engine.model import Model

DEFAULT_PROMPT = "What is 2+2?"


@dataclass
class BpeTokenizer:
    """A BPE tokenizer over an explicit vocabulary: byte-level (`kind="bpe"`, GPT-2 style, with a
    merge list) or SentencePiece-style (`kind="spm"`, llama.cpp's `llama` vocabulary: scores
    instead of merges, `\u2581` for spaces, `<0xXX>` byte fallback).

    Keeps the parts it was built from (`tokens`, `merges` / `scores`, `token_types`, `pre`) so
    that a writer can embed the same tokenizer in another container.
    """

    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    pre: str = DEFAULT_PRE
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    source: str = "<memory>"
    _backend: HfTokenizer | None = field(default=None, repr=False)
    kind: str = "bpe"
    scores: list[float] | None = None
    add_space_prefix: bool = True
    """SentencePiece only: a space in front of the text (and after each special token)."""
    from_file: bool = False
    """True when `_backend` is a tokenizer.json's own pipeline, not one built from the parts."""

    def __post_init__(self) -> None:
        if len(self.token_types) != len(self.tokens):
            raise TokenizerError(
                f"{self.source}: tokenizer has {len(self.tokens)} tokens but "
                f"{len(self.token_types)} token types"
            )
        if self.kind == "spm" and self.scores is not None:
            if len(self.scores) != len(self.tokens):
                raise TokenizerError(
                    f"{self.source}: tokenizer has {len(self.tokens)} tokens but "
                    f"{len(self.scores)} scores"
                )
            # NaN has no order, so the merge ranks derived from the scores would be arbitrary.
            bad = next((i for i, score in enumerate(self.scores) if math.isnan(score)), None)
            if bad is not None:
                raise TokenizerError(f"{self.source}: the score of token {bad} is NaN")

    def piece_scores(self) -> list[float]:
        """SentencePiece scores: the stored ones, or -id for normal pieces (earlier = merged first)."""
        if self.scores is not None:
            return list(self.scores)
        return [
            -float(i) if kind == TOKEN_TYPE_NORMAL else 0.0
            for i, kind in enumerate(self.token_types)
        ]

    def piece_score(self, token_id: int) -> float:
        """One entry of `piece_scores()`, without building the list."""
        if self.scores is not None:
            return self.scores[token_id]
        return -float(token_id) if self.token_types[token_id] == TOKEN_TYPE_NORMAL else 0.0

    @property
    def backend(self) -> HfTokenizer:
        """The `tokenizers` object, built on first use (opening a model stays cheap)."""
        if self._backend is None:
            self._backend = build_backend(self)
        return self._backend

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Unless the whole vocabulary's object is built already (or is a
        tokenizer.json's own pipeline), a vocabulary restricted to the text encodes it: the same
        ids for a fraction of the cost (`engine.bpe_backend.prompt_backend`)."""
        backend = self._backend
        if backend is None:
            backend = prompt_backend(self, text) or self.backend
        return list(backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.tokens):
            raise TokenizerError(
                f"{self.source}: token id {token_id} is outside the vocabulary (0..{len(self.tokens) - 1})"
            )
        return self.tokens[token_id]

    def special_token_ids(self) -> list[int]:
        return [
            i
            for i, kind in enumerate(self.token_types)
            if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        ]

    def to_tokenizer_json(self) -> str:
        """The HF `tokenizer.json` text of this tokenizer (written beside safetensors)."""
        return self.backend.to_str(pretty=False)


def bpe_from_tokenizer_json(path: Path) -> BpeTokenizer:
    """A `BpeTokenizer` from an HF `tokenizer.json` with a byte-level BPE model.

    Encoding uses the file's own pipeline (normalizer, pre-tokenizer, added tokens) through
    `tokenizers`; the vocabulary, merges and token kinds are extracted so that writers can embed
    the same tokenizer in a GGUF or APR file.
    """
    from tokenizers import Tokenizer

    try:
        text = path.read_text(encoding="utf-8")
        spec = loads_json(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: unreadable tokenizer.json: {error}") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") not in ("BPE", None):
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise TokenizerError(
            f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE only)"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: tokenizer.json has no BPE vocabulary")
    added = [
        entry
        for entry in spec.get("added_tokens") or []
        if isinstance(entry, dict) and isinstance(entry.get("content"), str)
    ]
    ids = [*vocab.values(), *(entry.get("id") for entry in added)]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TokenizerError(
            f"{path}: tokenizer.json has a token id that is not a non-negative integer"
        )
    size = max(ids, default=-1) + 1
    if size > 2 * len(ids) + 1024:  # ids must be (nearly) dense; a corrupt id must not size a list
        raise TokenizerError(f"{path}: token id {size - 1} is far beyond the {len(ids)} tokens")
    tokens = [f"[PAD{i}]" for i in range(size)]
    token_types = [TOKEN_TYPE_UNUSED] * size
    for token, token_id in vocab.items():
        tokens[token_id] = token
        token_types[token_id] = TOKEN_TYPE_NORMAL
    for entry in added:
        tokens[entry["id"]] = entry["content"]
        token_types[entry["id"]] = (
            TOKEN_TYPE_CONTROL if entry.get("special") else TOKEN_TYPE_USER_DEFINED
        )
    merges = [m if isinstance(m, str) else " ".join(map(str, m)) for m in model.get("merges") or []]
    try:
        backend = Tokenizer.from_str(text)
    except Exception as error:  # tokenizers raises plain Exception on a malformed file
        raise TokenizerError(f"{path}: unusable tokenizer.json: {error}") from None
    spm = bool(model.get("byte_fallback"))
    return BpeTokenizer(
        tokens=tokens,
        merges=merges,
        token_types=token_types,
        pre=_pre_from_tokenizer_json(spec),
        source=str(path),
        _backend=backend,
        kind="spm" if spm else "bpe",
        from_file=True,
    )


def _pre_from_tokenizer_json(spec: dict) -> str:
    """Which of llama.cpp's pre-tokenizer types a tokenizer.json's pre_tokenizer amounts to
    (for embedding it in GGUF / APR; encoding here always uses the file's own pipeline)."""
    text = json.dumps(spec.get("pre_tokenizer"))
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in text:
        return "qwen2"
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    return DEFAULT_PRE


def check_prompt_text(text: str) -> str:
    """`text` if it is valid Unicode, else ValueError naming the first bad byte.

    Python hands a command-line argument that is not valid UTF-8 over with each bad byte as a
    lone surrogate (surrogateescape); `tokenizers` refuses such a str with a TypeError.
    """
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            shown = f"0x{ord(char) - 0xDC00:02x}" if ord(char) >= 0xDC80 else f"U+{ord(char):04X}"
            raise ValueError(f"not valid UTF-8 text (byte {shown} at character {position})")
    return text


def encode_prompt(model: Model, prompt: str) -> list[int]:
    """The token ids `apr trace` runs for `prompt`: no chat template, BOS only when asked for."""
    try:
        check_prompt_text(prompt)
    except ValueError as error:
        raise TokenizerError(f"--prompt: {error}") from None
    tokenizer = model.tokenizer
    if tokenizer is None:
        reason = model.metadata.get("tokenizer_error", "the file carries no tokenizer")
        raise TokenizerError(f"{model.path}: cannot encode a prompt: {reason}; pass --tokens IDS")
    ids = tokenizer.encode(prompt)
    config = model.config
    if config.add_bos and config.bos_token_id is not None:
        ids = [config.bos_token_id, *ids]
    if not ids:
        raise TokenizerError(f"{model.path}: the prompt {prompt!r} gives no tokens")
    return ids


def same_prompt_encoding(first: Model, second: Model) -> bool:
    """True when `encode_prompt` gives the same ids for every prompt on both models, because
    their tokenizers were built from the same parts and they add the same BOS (a model and its
    converted copy). Comparing the parts (~10 ms for a 49,152-token vocabulary) is far cheaper
    than building a second `tokenizers` object (~0.15 s) to encode the same text again."""
    a, b = first.tokenizer, second.tokenizer
    if not isinstance(a, BpeTokenizer) or not isinstance(b, BpeTokenizer):
        return False
    if (first.config.add_bos, first.config.bos_token_id) != (
        second.config.add_bos,
        second.config.bos_token_id,
    ):
        return False
    if a.from_file or b.from_file:  # a tokenizer.json's own pipeline: not only the parts
        return a._backend is b._backend
    plain = ("kind", "pre", "bos_token_id", "eos_token_id", "add_space_prefix")
    if any(getattr(a, name) != getattr(b, name) for name in plain):
        return False
    if len(a.tokens) != len(b.tokens) or len(a.merges) != len(b.merges):
        return False
    scores_a = None if a.scores is None else list(a.scores)
    scores_b = None if b.scores is None else list(b.scores)
    return (
        list(a.token_types) == list(b.token_types)
        and list(a.merges) == list(b.merges)
        and list(a.tokens) == list(b.tokens)
        and scores_a == scores_b
    )


MAX_TOKEN_ID = 0xFFFFFFFF
"""apr's token ids are u32."""


def parse_token_ids(text: str, *, flag: str = "--tokens") -> list[int]:
    """`1,2,3` (spaces allowed) to a list of non-negative ids; one-line errors naming the flag."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip():
        raise TokenizerError(f"{flag}: empty token list; expected comma-separated ids like 1,2,3")
    ids: list[int] = []
    for position, part in enumerate(parts, start=1):
        if not part:
            raise TokenizerError(f"{flag}: empty entry at position {position} in {text!r}")
        if not (part.isascii() and part.isdigit()):
            raise TokenizerError(
                f"{flag}: {part!r} at position {position} is not a non-negative integer token id"
            )
        # Token ids are u32 in apr; checking the length first keeps int() away from a
        # 5000-digit string (beyond Python's int-conversion limit: a ValueError traceback).
        if len(part.lstrip("0")) > 10 or int(part) > MAX_TOKEN_ID:
            shown = part if len(part) <= 24 else f"{part[:20]}... ({len(part)} digits)"
            raise TokenizerError(
                f"{flag}: {shown} at position {position} is too large for a token id "
                f"(max {MAX_TOKEN_ID})"
            )
        ids.append(int(part))
    return ids
