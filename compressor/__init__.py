"""compressor: recipes of compression stages for Hugging Face models."""

__version__ = "0.1.0"
