"""dsq: a compression toolkit for DeepSeek language models."""
__version__ = "0.1.0"
