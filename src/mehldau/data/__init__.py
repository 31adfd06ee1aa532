"""Data: sources, splits, validation, token cache, datasets, the embedded demo corpus."""
