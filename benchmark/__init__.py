"""privseg: segmentation architectures trained under differential privacy, benchmarked."""

__version__ = "0.1.0"
