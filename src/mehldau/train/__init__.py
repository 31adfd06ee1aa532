"""The shared trainer (accelerate), checkpoints and run directories."""
