"""Model files: the registry of served models, their loader, and the embedded default."""
