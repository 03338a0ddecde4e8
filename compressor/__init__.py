"""compressor: recipes of compression stages for Hugging Face models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `compressor.load` imports torch and transformers; only pay for that when it is used.
    if name == "load":
        from compressor.runtime import load

        return load
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
