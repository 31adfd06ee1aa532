"""Guidance for the diffusion branch: rule functions that score decoded piano rolls (SCG)."""
