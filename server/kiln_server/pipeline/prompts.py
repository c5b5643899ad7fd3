"""Prompt encoding through both SDXL text encoders, with an LRU cache.

Matches diffusers' StableDiffusionXLPipeline.encode_prompt: each tokenizer pads to its
maximum length, each encoder contributes its penultimate hidden states (concatenated), the
second encoder's projected pooled output is the pooled embedding, and an absent negative
prompt is encoded as zeros when the model asks for that (force_zeros_for_empty_prompt).

A request's text-encoder LoRAs (`EncoderLoras`) apply to both its prompts, as diffusers
applies a loaded LoRA's text-encoder part. Prompts are encoded per request, one text per
encoder call, with the request's LoRAs set on the encoders' per-row layers for that call.
Trade-off: the text encoders never batch prompts of several requests (they did not
before either; a prompt costs a small fraction of one UNet step, and most are cache hits),
in exchange for a cache that stays per text: the key is the text plus the LoRAs' identity
and scales, so a base embedding is never served to a LoRA request nor the reverse, and
requests whose LoRAs have no text-encoder weights share the base entries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

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


class EncoderLoras(Protocol):
    """The text-encoder LoRAs of one request."""

    @property
    def key(self) -> Hashable:
        """Identifies the LoRAs and their scales: equal keys give equal embeddings."""

    def applied(self) -> AbstractContextManager[None]:
        """Within it, text-encoder calls of one row apply these LoRAs."""


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

    Results are cached by text and text-encoder LoRAs (most traffic repeats a handful of
    prompts); the cache is bounded and safe to use from several threads, but encoding with
    LoRAs belongs to the thread that owns the adapter stack (the engine thread).
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
        self._cache: OrderedDict[tuple[str, Hashable], PromptEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, text: str, loras: EncoderLoras | None = None) -> PromptEmbedding:
        """Embeddings of one text through encoders applying `loras` (None: the base
        model's), from the cache when possible."""
        key = (text, () if loras is None else loras.key)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        if loras is None:
            first, second = self._run_encoders(text)
        else:
            with loras.applied():
                first, second = self._run_encoders(text)
        embedding = PromptEmbedding(
            hidden_states=torch.cat(
                [first["hidden_states"], second["hidden_states"]], dim=-1
            ).clone(),
            pooled=second["text_embeds"].clone(),
        )
        with self._lock:
            self._cache[key] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    def _run_encoders(self, text: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Both encoders' outputs for one text."""
        first = self.engines.text_encoder.infer({"input_ids": self.tokenizer.token_ids(text, 0)})
        second = self.engines.text_encoder_2.infer({"input_ids": self.tokenizer.token_ids(text, 1)})
        return first, second

    def encode(
        self, prompt: str, negative_prompt: str | None, loras: EncoderLoras | None = None
    ) -> EncodedPrompts:
        """Positive and negative embeddings of a request whose text encoders apply `loras`
        (None: none). A negative prompt encoded as zeros stays zeros, as in diffusers."""
        positive = self.embed(prompt, loras)
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            negative = PromptEmbedding(
                torch.zeros_like(positive.hidden_states), torch.zeros_like(positive.pooled)
            )
        else:
            negative = self.embed(negative_prompt or "", loras)
        return EncodedPrompts(positive=positive, negative=negative)
