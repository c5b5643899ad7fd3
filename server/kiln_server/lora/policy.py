"""Which backends apply per-request LoRAs: the one rule the API process and the core share."""

from __future__ import annotations

# Backends whose UNet takes per-row LoRA adapters. onnxruntime and TensorRT need the
# adapter stacks and per-row indices as graph inputs, which their engines do not have yet.
LORA_BACKENDS = frozenset({"torch"})


def refusal_for_backend(backend: str) -> str | None:
    """None when a model on `backend` applies LoRAs; otherwise the message a request with
    `loras` gets (it names the field, the backend needed and the one the model runs on)."""
    if backend in LORA_BACKENDS:
        return None
    return f"loras: LoRAs need the torch backend for now; this model runs on {backend}"
