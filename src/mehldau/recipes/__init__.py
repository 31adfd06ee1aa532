"""Workflows the branches compose from the core (pretrain, adapt, generate, merge)."""
