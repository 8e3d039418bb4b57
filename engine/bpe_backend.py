"""`tokenizers` objects built from a vocabulary's parts: the whole vocabulary, or only the part
one text can use.

A GGUF or APR file stores a tokenizer as parts (tokens, merges or scores, token kinds, the
pre-tokenizer's name); `engine.tokenizer.BpeTokenizer` keeps them and asks this module for a
`tokenizers.Tokenizer` that encodes like llama.cpp: byte-level BPE with llama.cpp's splits for
the vocabulary's `pre` type, or SentencePiece-style BPE (merges implied by the scores, `\u2581`
for spaces, byte fallback), control and user-defined tokens matched whole.

Building the whole vocabulary costs ~0.17 s for SmolLM2's 49,152 tokens and 48,900 merges (a
dict and a list of pairs in Python, then the same in Rust): more than the whole forward pass of
a short prompt. A prompt only ever uses the tokens and merges that are substrings of its own
pieces: BPE splits each piece (a pre-tokenizer word, or a text between special tokens) into
characters and merges adjacent symbols, and a symbol is always a substring of its piece. So
`prompt_backend` builds a `tokenizers` object from just those (a few hundred for a chat prompt,
~5 ms), with every token keeping its id and every merge its relative rank, and it encodes the
text to the same ids as the whole vocabulary's object (tests/formats/test_prompt_tokenizer.py
compares the two on the real SmolLM2 and Gemma 3 vocabularies). Decoding, and writing a
tokenizer into another file, still build the whole one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import compress
from typing import TYPE_CHECKING

from engine.errors import TokenizerError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HfTokenizer

    from engine.tokenizer import BpeTokenizer

# GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# The text splits llama.cpp applies before byte-level BPE (`llama-vocab.cpp`, by `tokenizer.ggml.pre`).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "mpt": (_GPT2_SPLIT,),
    "olmo": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "codeshell": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
    "stablelm2": (_QWEN2_SPLIT,),
}
DEFAULT_PRE = "default"


SPACE = "\u2581"  # SentencePiece's visible space

PROMPT_SUBSTRING_BUDGET = 200_000
"""Substrings of a text's pieces that `prompt_backend` may examine; past it (a long prompt of
long unbroken pieces: a 1 MB run without spaces would have ~10^8) the whole vocabulary is built
instead, which costs the same for every text."""


def vocab_ids(tokens: list[str], ids: Iterable[int] | None = None) -> dict[str, int]:
    """Token -> id over `ids` in ascending order (every id by default); a duplicate spelling
    keeps its first id, as llama.cpp does."""
    pairs = enumerate(tokens) if ids is None else ((i, tokens[i]) for i in ids)
    vocab: dict[str, int] = {}
    for token_id, token in pairs:
        vocab.setdefault(token, token_id)
    return vocab


def added_token_ids(tok: BpeTokenizer) -> list[int]:
    """Ids of the control and user-defined tokens (matched whole in the text), in id order."""
    wanted = frozenset((TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED))
    return list(compress(range(len(tok.token_types)), map(wanted.__contains__, tok.token_types)))


def _add_special_tokens(backend: HfTokenizer, tok: BpeTokenizer, ids: list[int]) -> None:
    """Control tokens among `ids` as special added tokens, user-defined ones as plain added
    tokens: both are matched whole in the text, as llama.cpp does when it parses special
    tokens."""
    from tokenizers import AddedToken

    specials = [
        AddedToken(tok.tokens[i], special=True, normalized=False)
        for i in ids
        if tok.token_types[i] == TOKEN_TYPE_CONTROL
    ]
    user_defined = [
        AddedToken(tok.tokens[i], special=False, normalized=False)
        for i in ids
        if tok.token_types[i] == TOKEN_TYPE_USER_DEFINED
    ]
    if specials:
        backend.add_special_tokens(specials)
    if user_defined:
        backend.add_tokens(user_defined)


def spm_merges(
    tokens: list[str], token_types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a normal piece into two
    pieces of the vocabulary, best score first (llama.cpp merges the best-scoring pair first).

    Only split points where both halves have the length of some piece are tried, so the work
    is bounded by the vocabulary's size: a piece of n characters costs at most min(n, number of
    distinct piece lengths) look-ups, never all n splits (one 400 kB piece in a hostile GGUF
    made trying every split of it quadratic: minutes for a 0.4 MB file).
    """
    vocab = vocab_ids(tokens)
    lengths = sorted({len(token) for token in vocab})
    length_set = set(lengths)
    candidates: list[tuple[float, int, int, str, str]] = []
    for token_id, token in enumerate(tokens):
        if token_types[token_id] != TOKEN_TYPE_NORMAL or vocab[token] != token_id:
            continue
        size = len(token)
        local = []
        for k in lengths:
            if k >= size:
                break
            if size - k not in length_set:
                continue
            left = token[:k]
            if left not in vocab:
                continue
            right = token[k:]
            if right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        for _, _, left, right in sorted(local):  # ties in piece-id order
            candidates.append((scores[token_id], len(left), len(right), left, right))
    candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)  # stable: ties keep id order
    return [(left, right) for _, _, _, left, right in candidates]


def merge_pairs(tok: BpeTokenizer, merges: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """(rank, "left right") merges as (left, right) pairs, each checked for its two halves."""
    pairs: list[tuple[str, str]] = []
    for rank, merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"{tok.source}: merge {rank} {merge!r} is not 'left right'")
        pairs.append((left, right))
    return pairs


def _byte_level_pre_tokenizer(pre: str):
    """llama.cpp's splits for the vocabulary's `pre` type, then the byte-level mapping."""
    from tokenizers import Regex, pre_tokenizers

    splits = PRE_TOKENIZER_SPLITS.get(pre, PRE_TOKENIZER_SPLITS[DEFAULT_PRE])
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _bpe_tokenizer(
    tok: BpeTokenizer, vocab: dict[str, int], pairs: list[tuple[str, str]], added: list[int]
) -> HfTokenizer:
    """Byte-level BPE over `vocab` and `pairs` (rank order), llama.cpp's splits, `added` whole."""
    from tokenizers import Tokenizer, decoders, models

    try:
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=False)
        )
    except Exception as error:  # tokenizers raises plain Exception for merges naming unknown tokens
        raise TokenizerError(f"{tok.source}: unusable BPE tokenizer: {error}") from None
    backend.pre_tokenizer = _byte_level_pre_tokenizer(tok.pre)
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tok, added)
    return backend


def _spm_tokenizer(
    tok: BpeTokenizer, vocab: dict[str, int], pairs: list[tuple[str, str]], added: list[int]
) -> HfTokenizer:
    """SentencePiece-style BPE over `vocab` and `pairs`: `\u2581` for spaces, byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    unk = unknown_token(tok)
    try:
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
    except Exception as error:
        raise TokenizerError(f"{tok.source}: unusable SentencePiece vocabulary: {error}") from None
    steps = [normalizers.Replace(" ", SPACE)]
    if tok.add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if tok.add_space_prefix else [])
    )
    _add_special_tokens(backend, tok, added)
    return backend


def unknown_token(tok: BpeTokenizer) -> str | None:
    """The first token of kind UNKNOWN, if any."""
    return next(
        (t for t, k in zip(tok.tokens, tok.token_types, strict=True) if k == TOKEN_TYPE_UNKNOWN),
        None,
    )


def build_backend(tok: BpeTokenizer) -> HfTokenizer:
    """The whole vocabulary's `tokenizers` object (decoding, tokenizer.json, any text)."""
    added = added_token_ids(tok)
    if tok.kind == "spm":
        pairs = spm_merges(tok.tokens, tok.token_types, tok.piece_scores())
        return _spm_tokenizer(tok, vocab_ids(tok.tokens), pairs, added)
    pairs = merge_pairs(tok, list(enumerate(tok.merges)))
    return _bpe_tokenizer(tok, vocab_ids(tok.tokens), pairs, added)


# -- a vocabulary restricted to one text ---------------------------------------------------


def _split_on(text: str, tokens: list[str]) -> list[str]:
    """`text` without the occurrences of `tokens`, leftmost-longest as `tokenizers` matches its
    added tokens: the pieces between them."""
    if not tokens:
        return [text]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    return pattern.split(text)


def _substrings(pieces: set[str], longest: int) -> set[str] | None:
    """Every substring of every piece up to `longest` characters, or None past the budget."""
    cost = sum(len(p) * min(len(p), longest) for p in pieces)
    if cost > PROMPT_SUBSTRING_BUDGET:
        return None
    found: set[str] = set()
    for piece in pieces:
        size = len(piece)
        for start in range(size):
            stop = min(size, start + longest)
            found.update(piece[start:end] for end in range(start + 1, stop + 1))
    return found


def prompt_backend(tok: BpeTokenizer, text: str) -> HfTokenizer | None:
    """A `tokenizers` object that encodes `text` to the same ids as `build_backend(tok)`, built
    from only the tokens and merges `text` can use; None when `text` is too big for that to pay.
    """
    added_ids = [i for i in added_token_ids(tok) if tok.tokens[i] in text]
    added_set = {tok.tokens[i] for i in added_ids}
    # An empty added token (a hostile vocabulary) matches nowhere in `tokenizers`; in a regex
    # it would match everywhere.
    segments = [s for s in _split_on(text, sorted(t for t in added_set if t)) if s]
    if tok.kind == "spm":
        # The normalizer runs on each segment: spaces become \u2581, and one is put in front.
        pieces = {s.replace(" ", SPACE) for s in segments}
        pieces |= {SPACE + p for p in pieces}
    else:
        pre = _byte_level_pre_tokenizer(tok.pre)
        pieces = {word for s in segments for word, _ in pre.pre_tokenize_str(s)}
    longest = max(map(len, tok.tokens), default=0)
    found = _substrings(pieces, longest)
    if found is None:
        return None
    keep = found | added_set
    # compress/map loop in C: ~1 ms for 49,152 tokens where a comprehension takes ~7 ms.
    kept_ids = list(compress(range(len(tok.tokens)), map(keep.__contains__, tok.tokens)))
    if tok.kind == "spm":
        # Byte-fallback pieces (<0xXX>) and the unknown piece stand for characters the
        # vocabulary lacks, whatever the text: always kept.
        fallback = frozenset((TOKEN_TYPE_BYTE, TOKEN_TYPE_UNKNOWN))
        types = tok.token_types
        kept_ids = sorted(
            {*kept_ids, *compress(range(len(types)), map(fallback.__contains__, types))}
        )
    vocab = vocab_ids(tok.tokens, kept_ids)
    if tok.kind == "spm":
        # Merges of the kept pieces only: both halves of a kept piece are kept too, and the
        # order of the kept ids is the order of the whole vocabulary, so ranks keep their order.
        pairs = spm_merges(
            [tok.tokens[i] for i in kept_ids],
            [tok.token_types[i] for i in kept_ids],
            [tok.piece_score(i) for i in kept_ids],
        )
        return _spm_tokenizer(tok, vocab, pairs, added_ids)
    # The "left right" spellings of every split of a found substring in two: one set look-up
    # per merge, instead of rebuilding every merge's concatenation.
    spellings = {f"{s[:k]} {s[k:]}" for s in found for k in range(1, len(s))}
    merges = list(compress(enumerate(tok.merges), map(spellings.__contains__, tok.merges)))
    return _bpe_tokenizer(tok, vocab, merge_pairs(tok, merges), added_ids)
