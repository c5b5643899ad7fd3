"""Engines: the only layer that knows which runtime executes a model component's graph."""
