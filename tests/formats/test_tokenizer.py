"""Prompts to ids: pre-tokenizer splits, special tokens, BOS rules and --tokens parsing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.errors import TokenizerError
from engine.synth import synth_tokenizer, synthesize
from engine.tokenizer import DEFAULT_PROMPT, BpeTokenizer, encode_prompt, parse_token_ids


def test_default_prompt():
    assert DEFAULT_PROMPT == "What is 2+2?"


def test_synth_tokenizer_ids_are_fixed():
    tok = synth_tokenizer()
    # 0..2 specials, 3..258 bytes in byte order (byte b is id b + 3), then merges from 259.
    assert tok.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.encode("What") == [261]  # W h -> Wh (259), Wh a (260), Wha t (261)
    assert tok.encode(" is") == [263]  # Ġ i (262), Ġi s (263)
    assert tok.encode("2+2?") == [ord("2") + 3, ord("+") + 3, ord("2") + 3, ord("?") + 3]
    assert tok.encode("\n") == [ord("\n") + 3]
    assert tok.decode(tok.encode("What is 2+2?")) == "What is 2+2?"


def test_special_tokens_are_matched_whole_and_user_defined_too():
    tok = synth_tokenizer(vocab_size=300)
    assert tok.vocab_size == 300
    assert tok.encode("<|im_start|>x<|extra_3|>") == [1, ord("x") + 3, 280]
    assert tok.token_text(280) == "<|extra_3|>"
    with pytest.raises(
        TokenizerError, match=r"token id 300 is outside the vocabulary \(0\.\.299\)"
    ):
        tok.token_text(300)


def _digits_tokenizer(pre: str) -> BpeTokenizer:
    base = synth_tokenizer()
    tokens = [*base.tokens, "12", "123"]
    merges = [*base.merges, "1 2", "12 3"]
    return BpeTokenizer(
        tokens=tokens, merges=merges, token_types=[*base.token_types, 1, 1], pre=pre
    )


def test_smollm_pre_tokenizer_splits_digits_one_by_one():
    # llama.cpp's SMOLLM regex splits \p{N} first; the GPT-2 regex keeps " 123" together.
    assert _digits_tokenizer("smollm").encode("123") == [ord("1") + 3, ord("2") + 3, ord("3") + 3]
    assert _digits_tokenizer("default").encode("123") == [
        _digits_tokenizer("default").tokens.index("123")
    ]


def test_llama3_pre_tokenizer_groups_three_digits():
    tok = _digits_tokenizer("llama-bpe")
    assert tok.encode("1234") == [tok.tokens.index("123"), ord("4") + 3]


def test_encode_prompt_adds_bos_only_when_asked():
    model = synthesize("llama")
    assert encode_prompt(model, "What") == [261]
    with_bos = replace(model, config=replace(model.config, add_bos=True))
    assert encode_prompt(with_bos, "What") == [1, 261]


def test_encode_prompt_without_tokenizer_names_the_file_and_the_way_out():
    model = replace(
        synthesize("llama"),
        tokenizer=None,
        metadata={"tokenizer_error": "tokenizer.ggml.model 'llama' is not supported"},
    )
    with pytest.raises(
        TokenizerError,
        match=r"synth-llama-s0: cannot encode a prompt: tokenizer\.ggml\.model 'llama' is not supported; pass --tokens IDS",
    ):
        encode_prompt(model, "hi")


def test_empty_prompt_is_an_error():
    with pytest.raises(TokenizerError, match=r"the prompt '' gives no tokens"):
        encode_prompt(synthesize("llama"), "")


def test_parse_token_ids():
    assert parse_token_ids("1,2,3") == [1, 2, 3]
    assert parse_token_ids(" 7 , 0,42 ") == [7, 0, 42]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"--tokens: empty token list; expected comma-separated ids like 1,2,3"),
        ("1,,2", r"--tokens: empty entry at position 2 in '1,,2'"),
        ("1,x", r"--tokens: 'x' at position 2 is not a non-negative integer token id"),
        ("-1", r"--tokens: '-1' at position 1 is not a non-negative integer token id"),
        ("1.5", r"'1\.5' at position 1 is not a non-negative integer"),
    ],
)
def test_parse_token_ids_errors(text, message):
    with pytest.raises(TokenizerError, match=message):
        parse_token_ids(text)


# --- SentencePiece-style vocabularies (GGUF tokenizer.ggml.model "llama") ------------------------

PIECES = [
    "▁",
    "a",
    "b",
    "e",
    "h",
    "l",
    "o",
    "w",
    "r",
    "d",
    "t",
    "s",
    "i",
    "n",
    "▁h",
    "▁he",
    "ll",
    "llo",
    "▁hello",
    "▁w",
    "or",
    "▁wor",
    "ld",
    "▁world",
    "is",
    "▁is",
    "▁t",
    "th",
    "▁th",
    "▁this",
    "in",
    "▁a",
]


def spm_tokenizer() -> BpeTokenizer:
    """<unk> <s> </s>, 256 byte pieces <0x00>..<0xFF> (ids 3..258), then PIECES best-first."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    types = [2, 3, 3, *[6] * 256, *[1] * len(PIECES)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    return BpeTokenizer(
        tokens=tokens,
        merges=[],
        token_types=types,
        kind="spm",
        scores=scores,
        bos_token_id=1,
        eos_token_id=2,
    )


def piece(text: str) -> int:
    return 259 + PIECES.index(text)


def test_spm_merges_best_score_first_with_space_prefix():
    tok = spm_tokenizer()
    assert tok.encode("hello world") == [piece("▁hello"), piece("▁world")]
    assert tok.encode("this is a world") == [
        piece("▁this"),
        piece("▁is"),
        piece("▁a"),
        piece("▁world"),
    ]
    assert tok.decode(tok.encode("this is a world")) == "this is a world"


def test_spm_byte_fallback_for_unknown_characters():
    tok = spm_tokenizer()
    # é is UTF-8 C3 A9 and "\n" is 0A: byte pieces <0xC3> = id 3 + 0xC3, and so on.
    assert tok.encode("hé\n") == [piece("▁h"), 3 + 0xC3, 3 + 0xA9, 3 + 0x0A]
    assert tok.decode(tok.encode("héllo\nworld")) == "héllo\nworld"


def test_spm_space_prefix_as_llama_cpp_adds_it():
    tok = spm_tokenizer()
    # llama.cpp prepends a space to the text and again after every special token.
    assert tok.encode(" hello") == [piece("▁"), piece("▁hello")]
    assert tok.encode("hello</s>hello") == [piece("▁hello"), 2, piece("▁hello")]
    no_prefix = replace(spm_tokenizer(), add_space_prefix=False, _backend=None)
    assert no_prefix.encode("hello world") == [
        piece("h"),
        piece("e"),
        piece("llo"),
        piece("▁world"),
    ]
