"""Conventions every layer shares, defined once.

`IGNORE_INDEX`: the label of a position without a target (padding, a style prefix, a packed
sample's start). -100 is what `torch.nn.functional.cross_entropy` ignores by default, so the
datasets, the models' losses and the trainer's target count agree without passing it around.
"""

IGNORE_INDEX = -100
