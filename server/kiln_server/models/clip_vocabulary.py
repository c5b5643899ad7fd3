"""The real CLIP byte-pair vocabulary, built from the data file open_clip ships.

Kiln builds its tokenizers from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (the file every
CLIP tokenizer derives from), so prompts tokenize exactly as for real SDXL checkpoints.
open_clip is installed without its dependencies only to carry that file; it is located
with importlib and never imported (importing it would need torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 48,894 merges: 49,408 tokens = 512 byte tokens + merges + 2 specials.
NUM_MERGES = 49152 - 256 - 2
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ClipVocabulary:
    """Token-to-id table and ordered merges of the CLIP BPE tokenizer."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]


def bpe_file() -> Path:
    """Path of the BPE data file inside the installed open_clip package.

    Raises FileNotFoundError naming the install command when open_clip is missing.
    """
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"CLIP vocabulary file {BPE_FILE_NAME} not found: install it with "
        "`pip install --no-deps open_clip_torch` (make does this)"
    )


def _byte_symbols() -> list[str]:
    """One printable unicode symbol per byte value, in CLIP's (GPT-2's) byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [symbols[b] for b in order]


@cache
def load_clip_vocabulary(path: Path | None = None) -> ClipVocabulary:
    """Read the BPE file and build CLIP's 49,408-token vocabulary and merge list."""
    text = gzip.decompress((path or bpe_file()).read_bytes()).decode("utf-8")
    merge_lines = text.split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    tokens = _byte_symbols()
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return ClipVocabulary(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[(a, b) for a, b in merges],
    )


def sdxl_tokenizers(max_tokens: int = 77) -> tuple[Any, Any]:
    """SDXL's two CLIPTokenizers over the real CLIP vocabulary.

    The first pads with the end token, the second with "!" (id 0), as SDXL base does.
    """
    from transformers import CLIPTokenizer

    vocabulary = load_clip_vocabulary()

    def tokenizer(pad_token: str) -> Any:
        return CLIPTokenizer(
            vocab=vocabulary.vocab,
            # transformers 5's fast tokenizer takes merges as (left, right) pairs.
            merges=cast(Any, vocabulary.merges),
            pad_token=pad_token,
            model_max_length=max_tokens,
        )

    return tokenizer("<|endoftext|>"), tokenizer("!")
