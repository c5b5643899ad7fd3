"""Kiln's gRPC server: validation, batching, the SDXL pipeline and its engines."""
