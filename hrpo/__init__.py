"""HRPO: hybrid reasoning policy optimization (arXiv 2505.18454)."""

__version__ = "0.1.0"
