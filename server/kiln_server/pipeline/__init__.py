"""The SDXL pipeline: Kiln's own denoising loop over engines, one step at a time."""
