"""Which backends apply per-request LoRAs: the one rule the API process and the core share."""

from __future__ import annotations

from typing import Any

# Backends whose UNet can take per-row LoRA adapters: torch always; onnxruntime and
# TensorRT when their UNet graph was built with the LoRA inputs (`refusal_for_engines`).
LORA_BACKENDS = frozenset({"torch", "onnxruntime", "tensorrt"})


def refusal_for_backend(backend: str) -> str | None:
    """None when a model on `backend` may apply LoRAs; otherwise the message a request with
    `loras` gets (it names the field, the backends that apply them and the one the model
    runs on)."""
    if backend in LORA_BACKENDS:
        return None
    return (
        f"loras: LoRAs need one of the backends {', '.join(sorted(LORA_BACKENDS))}; this "
        f"model runs on {backend}"
    )


def refusal_for_engines(engines: Any) -> str | None:
    """None when the loaded engine set applies LoRAs, as far as its engines go; otherwise
    the message a request with `loras` gets. Compiled engines whose UNet graph was built
    without LoRA inputs for a model with LoRA folders refuse naming the rebuild command."""
    refusal = refusal_for_backend(engines.backend)
    if refusal is not None:
        return refusal
    lora = getattr(engines.unet, "lora", None)
    return getattr(lora, "refusal", None)
