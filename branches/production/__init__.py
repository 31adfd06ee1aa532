"""Branch production."""
