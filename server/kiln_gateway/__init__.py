"""Kiln's Replicate-compatible HTTP gateway.

`kiln gateway` serves Replicate's predictions API (the subset the official clients use) and
forwards every prediction to a Kiln gRPC server through `kiln_client.aio.AsyncKilnClient`.
Applications written for Replicate run unchanged once `REPLICATE_BASE_URL` points here.
Build the ASGI app with `kiln_gateway.app.create_app(GatewaySettings(...))`.
"""
