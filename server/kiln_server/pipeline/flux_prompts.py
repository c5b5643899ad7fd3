"""Prompt encoding for FLUX-family models, with an LRU cache.

Matches diffusers' FluxPipeline.encode_prompt: the CLIP tokenizer pads to its 77 tokens
and the CLIP encoder's pooled output is the pooled embedding; the T5 tokenizer pads and
truncates to the model's served T5 length and the T5 encoder's last hidden states (no
attention mask) are the context. A negative prompt is always encoded as text (FLUX never
uses zero embeddings).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from kiln_server.engines.flux_engines import FluxEngineSet
from kiln_server.models.flux_loader import FluxModelFiles


@dataclass(frozen=True)
class FluxPromptEmbedding:
    """T5 context [1, t5_tokens, D] and CLIP pooled [1, P] embeddings of one prompt."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor


class FluxPromptTokenizer:
    """Both FLUX tokenizers: prompt lengths for validation and padded ids for the encoders.

    Needs no weights. The T5 sequence is the prompt's limit (`max_tokens`): CLIP, which
    only contributes the pooled summary, truncates at 77 tokens as diffusers does.
    """

    def __init__(self, clip_tokenizer: Any, t5_tokenizer: Any, t5_tokens: int) -> None:
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.t5_tokens = t5_tokens

    @classmethod
    def for_model(cls, files: FluxModelFiles) -> FluxPromptTokenizer:
        """The tokenizers of a folder read by `read_flux_model_files`."""
        return cls(files.tokenizer, files.tokenizer_2, files.max_sequence_length)

    @property
    def max_tokens(self) -> int:
        """Longest prompt in T5 tokens, the end token included."""
        return self.t5_tokens

    def count_tokens(self, text: str) -> int:
        """T5 tokens `text` needs, the end token included."""
        return len(self.t5_tokenizer(text, truncation=False).input_ids)

    def clip_ids(self, text: str) -> torch.Tensor:
        """int32 CLIP ids [1, 77], padded and truncated."""
        tokenizer = self.clip_tokenizer
        ids = tokenizer(
            text,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(torch.int32)

    def t5_ids(self, text: str) -> torch.Tensor:
        """int32 T5 ids [1, t5_tokens], padded and truncated."""
        ids = self.t5_tokenizer(
            text,
            padding="max_length",
            max_length=self.t5_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(torch.int32)


class FluxPromptEncoder:
    """Encodes prompts with the model's tokenizers and its CLIP and T5 engines.

    Results are cached by text (most traffic repeats a handful of prompts); the cache is
    bounded and safe to use from several threads.
    """

    def __init__(
        self, tokenizer: FluxPromptTokenizer, engines: FluxEngineSet, *, cache_size: int = 256
    ) -> None:
        self.tokenizer = tokenizer
        self.engines = engines
        self.cache_size = cache_size
        self._cache: OrderedDict[str, FluxPromptEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, text: str) -> FluxPromptEmbedding:
        """Embeddings of one text, from the cache when possible."""
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return cached
        pooled = self.engines.text_encoder.infer({"input_ids": self.tokenizer.clip_ids(text)})
        context = self.engines.text_encoder_2.infer({"input_ids": self.tokenizer.t5_ids(text)})
        embedding = FluxPromptEmbedding(
            hidden_states=context["hidden_states"].clone(), pooled=pooled["pooled"].clone()
        )
        with self._lock:
            self._cache[text] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding
