"""The pipelines the batcher drives, one per model family, and their per-request states.

Both offer the same stepwise interface: `prepare(params)` -> state, `denoise_step(states)`
for states of one shape, `preview_size` / `preview_pixels`, `decode(state)`, `rows_for`,
`limits`, `loras`, `backend`, `engines`, `device`.
"""

from __future__ import annotations

from kiln_server.pipeline.flux import FluxDenoiseState, FluxPipeline
from kiln_server.pipeline.sdxl import DenoiseState, SDXLPipeline

Pipeline = SDXLPipeline | FluxPipeline
"""A resident model's pipeline."""

State = DenoiseState | FluxDenoiseState
"""One request's denoising state, of the pipeline that prepared it."""
