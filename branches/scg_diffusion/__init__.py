"""Branch scg_diffusion."""
