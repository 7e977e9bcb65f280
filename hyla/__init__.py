"""hyla: training hybrid linear-attention language models at million-token contexts."""

__version__ = "0.1.0"
