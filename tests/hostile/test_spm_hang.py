"""The SentencePiece merge derivation is bounded by the vocabulary's size (issue 11, "a hang"):
one 400 kB piece made deriving merges try every split of it, and `trace` ran for minutes on a
0.4 MB GGUF."""

from __future__ import annotations

import random

from engine.formats import gguf
from engine.tokenizer import TOKEN_TYPE_NORMAL, spm_merges
from tests.hostile.conftest import run_cli
from tests.hostile.test_tracebacks import spm_model


def merges_by_definition(tokens, types, scores):
    """The definition, written plainly: every split of every normal piece into two pieces of
    the vocabulary, best score first, ties by (left length, right length) then piece ids."""
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    found = []
    for token_id, token in enumerate(tokens):
        if types[token_id] != TOKEN_TYPE_NORMAL or vocab[token] != token_id:
            continue
        local = sorted(
            (vocab[token[:k]], vocab[token[k:]], token[:k], token[k:])
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        )
        found += [(scores[token_id], len(a), len(b), a, b) for _, _, a, b in local]
    found.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    return [(a, b) for _, _, _, a, b in found]


def test_bounded_derivation_gives_the_merges_of_the_definition():
    """Skipping split points whose halves have no piece's length changes nothing."""
    rng = random.Random(11)
    for _ in range(30):
        alphabet = "ab\u2581c"
        tokens = sorted(
            {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(80)}
        )
        types = [rng.choice([TOKEN_TYPE_NORMAL] * 5 + [3]) for _ in tokens]
        scores = [float(rng.randint(-20, 0)) for _ in tokens]
        assert spm_merges(tokens, types, scores) == merges_by_definition(tokens, types, scores)


def test_trace_of_a_gguf_with_a_1mb_piece_finishes(apr_tui, tmp_path):
    """Was: ~10^6 splits of a 1 MB string, each copying it (minutes; 400 kB took 45 s). The
    subprocess timeout turns a regression into a failure, not a timing claim."""
    path = gguf.write(spm_model(extra_pieces=["x" * 1_000_000]), tmp_path / "big-piece.gguf")
    assert path.stat().st_size > 1_000_000
    result = run_cli(
        apr_tui,
        "trace",
        path,
        "--save-tensor",
        "attn_norm",
        "--prompt",
        "hello",
        "--save-tensor-dir",
        tmp_path / "out",
        timeout=60,
        text=True,
    )
    assert result.returncode == 0, result.stderr
