"""A vocabulary restricted to one text (engine.bpe_backend.prompt_backend) encodes that text to
the same ids as the whole vocabulary's `tokenizers` object, on the real SmolLM2 (byte-level BPE)
and Gemma 3 (SentencePiece-style) vocabularies and on texts chosen to stress the restriction:
special tokens next to spaces and newlines, digits, characters outside the vocabulary (byte
fallback), long pieces, and random concatenations of vocabulary entries.

The oracle is `build_backend`, the whole vocabulary built by `tokenizers` itself (checked
against llama.cpp's own tokenization in tests/noise and tests/forward).
"""

from __future__ import annotations

import random

import pytest

from engine.bpe_backend import PROMPT_SUBSTRING_BUDGET, build_backend, prompt_backend
from engine.formats import open_model
from engine.synth import synth_tokenizer
from engine.tokenizer import TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)

FIXED_TEXTS = [
    "What is 2+2?",
    CHAT,
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\nthree",
    "numbers 1234567 3.14159 -42 1e-7 0x1F",
    "caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m",
    "\u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f \uc548\ub155\ud558\uc138\uc694",
    "emoji \U0001f600\U0001f680 and \u2603 and a private use \ue000 character",
    "don't won't it's we'll they'd I'm you've",
    "x" * 300,
    "a" + " " * 40 + "b",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|im_end|><|im_end|> <|im_start|>\n<|im_start|>",
    "",
]


def _random_texts(tokenizer, count: int, seed: int) -> list[str]:
    """Concatenations of random vocabulary entries (as text), special tokens and separators."""
    rng = random.Random(seed)
    backend = build_backend(tokenizer)
    normal = [i for i, kind in enumerate(tokenizer.token_types) if kind == TOKEN_TYPE_NORMAL]
    specials = [tokenizer.tokens[i] for i, k in enumerate(tokenizer.token_types) if k == 3]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 25)):
            roll = rng.random()
            if roll < 0.1 and specials:
                parts.append(rng.choice(specials))
            elif roll < 0.2:
                parts.append(rng.choice([" ", "\n", "  ", "\t", "7", "42", "!", "\u00e9"]))
            else:
                parts.append(backend.decode([rng.choice(normal)]))
        texts.append("".join(parts))
    return texts


def _assert_same_ids(tokenizer, texts: list[str]) -> None:
    whole = build_backend(tokenizer)
    for text in texts:
        restricted = prompt_backend(tokenizer, text)
        assert restricted is not None, f"restriction refused a short text: {text[:60]!r}"
        expected = whole.encode(text, add_special_tokens=False).ids
        got = restricted.encode(text, add_special_tokens=False).ids
        assert got == expected, f"ids differ for {text[:80]!r}"


def test_smollm2_restricted_vocabulary_encodes_like_the_whole(smollm2_gguf):
    tokenizer = open_model(smollm2_gguf).tokenizer
    assert tokenizer.kind == "bpe"
    _assert_same_ids(tokenizer, FIXED_TEXTS + _random_texts(tokenizer, 60, seed=13))


def test_gemma3_restricted_vocabulary_encodes_like_the_whole(gemma3_gguf):
    tokenizer = open_model(gemma3_gguf).tokenizer
    assert tokenizer.kind == "spm"
    _assert_same_ids(tokenizer, FIXED_TEXTS + _random_texts(tokenizer, 12, seed=7))


def test_restriction_keeps_only_what_the_text_can_use(smollm2_gguf):
    """The point of it: a chat prompt needs a few hundred of the 49,152 tokens."""
    tokenizer = open_model(smollm2_gguf).tokenizer
    vocab = prompt_backend(tokenizer, CHAT).get_vocab()
    assert 50 < len(vocab) < 2_000
    assert vocab["<|im_start|>"] == tokenizer.tokens.index("<|im_start|>")  # ids are kept
    assert "<|endoftext|>" not in vocab  # a special token absent from the text


def test_long_unbroken_text_falls_back_to_the_whole_vocabulary(smollm2_gguf):
    tokenizer = open_model(smollm2_gguf).tokenizer
    text = "ab" * (PROMPT_SUBSTRING_BUDGET // 4)  # one piece: its substrings exceed the budget
    assert prompt_backend(tokenizer, text) is None
    ids = tokenizer.encode(text)  # encode still answers, through the whole vocabulary
    assert ids == build_backend(tokenizer).encode(text, add_special_tokens=False).ids
    assert tokenizer._backend is not None


def test_encode_uses_the_restriction_until_the_whole_vocabulary_is_built(smollm2_gguf):
    tokenizer = open_model(smollm2_gguf).tokenizer
    ids = tokenizer.encode(CHAT)
    assert tokenizer._backend is None  # nothing built for the whole vocabulary
    assert tokenizer.decode(ids) == CHAT  # decoding builds it, and round-trips
    assert tokenizer._backend is not None
    assert tokenizer.encode(CHAT) == ids


@pytest.mark.parametrize("pre", ["smollm", "llama3", "gpt2", "qwen2"])
def test_synthetic_vocabularies_with_user_defined_tokens(pre):
    natural = synth_tokenizer()
    base = synth_tokenizer(len(natural.tokens) + 3)  # 3 user-defined <|extra_N|> tokens
    base.pre = pre
    assert any(kind == TOKEN_TYPE_CONTROL for kind in base.token_types)
    user = [base.tokens[i] for i, kind in enumerate(base.token_types) if kind == 4]
    texts = [f"{user[0]}abc {user[-1]} 123", f"x{user[1]}{user[1]}y", *FIXED_TEXTS]
    _assert_same_ids(base, texts + _random_texts(base, 20, seed=3))


def test_an_empty_added_token_does_not_split_the_text():
    """A hostile vocabulary with an empty user-defined token: `tokenizers` never matches it, so
    the restriction must not split the text at every character either."""
    natural = synth_tokenizer()
    tokenizer = synth_tokenizer(len(natural.tokens) + 2)
    tokenizer.tokens[-1] = ""
    _assert_same_ids(tokenizer, ["hello world", "a<|extra_0|>b", *FIXED_TEXTS])
