"""The four branches, each composing the core into its own pipeline."""
