"""Command-line entry points (Hydra compose API)."""
