"""mehldau: jazz piano generation in the style of Brad Mehldau, four approaches on one core."""

__version__ = "0.1.0"
