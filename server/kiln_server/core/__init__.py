"""The engine core: the batcher and the resident pipelines, in a process of their own.

The API process (gRPC, validation, image encoding) and the engine core talk over one socket
pair (`messages`). Keeping the denoising loop out of the API process means gRPC's per-message
work never waits on, or holds up, the engine's interpreter lock.
"""
