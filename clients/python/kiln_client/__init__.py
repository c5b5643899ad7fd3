"""Typed Python client for Kiln's gRPC GenerationService (sync and asyncio) and the `kiln` CLI."""
