"""T5 tokenizers built by the project from an explicit vocabulary (no hub, no training).

FLUX's second text encoder is a T5 encoder whose tokenizer is a SentencePiece Unigram
model. A small model needs no learned vocabulary: every word it should know becomes one
piece ("▁word"), and single characters back off everything else, so no prompt loses text
to `<unk>` unless it uses characters outside ASCII. The ids follow T5's layout: `<pad>` 0,
`</s>` 1, `<unk>` 2, then the pieces, no `<extra_id_*>` sentinels. Like real T5 it is
case-sensitive (a normalizer would not survive a save and reload in transformers 5).
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Any

WORD_BOUNDARY = "\u2581"
# Scores are log-probabilities: whole words beat spelling them out letter by letter.
WORD_SCORE = -1.0
BOUNDARY_SCORE = -2.0
CHARACTER_SCORE = -5.0
FALLBACK_CHARACTERS = string.ascii_letters + string.digits + string.punctuation


def project_t5_vocabulary(words: Iterable[str]) -> list[tuple[str, float]]:
    """The Unigram vocabulary (piece, score) for `words`: special tokens, one piece per
    distinct word (sorted, so the ids do not depend on the order given), then the
    single-character fallback pieces. ValueError for a word holding whitespace."""
    distinct = sorted(set(words))
    for word in distinct:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"T5 vocabulary word {word!r} must be non-empty without whitespace")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (WORD_BOUNDARY, BOUNDARY_SCORE)]
    vocab += [(WORD_BOUNDARY + word, WORD_SCORE) for word in distinct]
    known = {piece for piece, _ in vocab}
    vocab += [(c, CHARACTER_SCORE) for c in FALLBACK_CHARACTERS if c not in known]
    return vocab


def project_t5_tokenizer(words: Iterable[str], max_tokens: int) -> Any:
    """A transformers T5Tokenizer over `project_t5_vocabulary(words)` whose
    `model_max_length` is `max_tokens` (the T5 sequence length the model is served at)."""
    from transformers import T5Tokenizer

    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (a word and </s>), got {max_tokens}")
    return T5Tokenizer(vocab=project_t5_vocabulary(words), extra_ids=0, model_max_length=max_tokens)
