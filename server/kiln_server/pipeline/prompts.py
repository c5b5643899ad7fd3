"""Prompt encoding through both SDXL text encoders, with an LRU cache.

Matches diffusers' StableDiffusionXLPipeline.encode_prompt: each tokenizer pads to its
maximum length, each encoder contributes its penultimate hidden states (concatenated), the
second encoder's projected pooled output is the pooled embedding, and an absent negative
prompt is encoded as zeros when the model asks for that (force_zeros_for_empty_prompt).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from kiln_server.engines.base import EngineSet
from kiln_server.models.loader import SDXLModelFiles


@dataclass(frozen=True)
class PromptEmbedding:
    """Context [1, tokens, C1+C2] and pooled [1, P] embeddings of one prompt."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class EncodedPrompts:
    """The positive and negative embeddings of one request."""

    positive: PromptEmbedding
    negative: PromptEmbedding


class PromptTokenizer:
    """Both SDXL tokenizers: prompt lengths for validation and padded ids for the encoders.

    Needs no weights, so the API process can validate prompts while the engine process
    holds the text encoders.
    """

    def __init__(self, tokenizer: Any, tokenizer_2: Any) -> None:
        self.tokenizers = (tokenizer, tokenizer_2)

    @classmethod
    def for_model(cls, files: SDXLModelFiles) -> PromptTokenizer:
        """The tokenizers of a model folder read by `read_model_files`."""
        return cls(files.tokenizer, files.tokenizer_2)

    @property
    def max_tokens(self) -> int:
        """Longest prompt in tokens, start and end tokens included."""
        return int(min(t.model_max_length for t in self.tokenizers))

    def count_tokens(self, text: str) -> int:
        """Tokens `text` needs (with start and end tokens), the larger of both tokenizers."""
        return max(len(t(text, truncation=False).input_ids) for t in self.tokenizers)

    def token_ids(self, text: str, which: int) -> torch.Tensor:
        """int32 ids [1, max_tokens] of tokenizer `which` (0 or 1), padded and truncated."""
        tokenizer = self.tokenizers[which]
        ids = tokenizer(
            text,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(torch.int32)


class PromptEncoder:
    """Encodes prompts with the model's tokenizers and text-encoder engines.

    Results are cached by text (most traffic repeats a handful of prompts); the cache is
    bounded and safe to use from several threads.
    """

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        engines: EngineSet,
        *,
        force_zeros_for_empty_prompt: bool = True,
        cache_size: int = 256,
    ) -> None:
        self.tokenizer = tokenizer
        self.engines = engines
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PromptEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, text: str) -> PromptEmbedding:
        """Embeddings of one text, from the cache when possible."""
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return cached
        first = self.engines.text_encoder.infer({"input_ids": self.tokenizer.token_ids(text, 0)})
        second = self.engines.text_encoder_2.infer({"input_ids": self.tokenizer.token_ids(text, 1)})
        embedding = PromptEmbedding(
            hidden_states=torch.cat(
                [first["hidden_states"], second["hidden_states"]], dim=-1
            ).clone(),
            pooled=second["text_embeds"].clone(),
        )
        with self._lock:
            self._cache[text] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    def encode(self, prompt: str, negative_prompt: str | None) -> EncodedPrompts:
        """Positive and negative embeddings of a request."""
        positive = self.embed(prompt)
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            negative = PromptEmbedding(
                torch.zeros_like(positive.hidden_states), torch.zeros_like(positive.pooled)
            )
        else:
            negative = self.embed(negative_prompt or "")
        return EncodedPrompts(positive=positive, negative=negative)
