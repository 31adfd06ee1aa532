"""Branch perceiver_mt."""
