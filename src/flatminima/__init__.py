"""flatminima: entropic flat-minima optimizers and flatness measures for PyTorch."""

__version__ = "0.1.0"
