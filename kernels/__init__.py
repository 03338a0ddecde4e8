"""Runtime modules for compressed layers (installed as ``compressor.kernels``)."""

if __name__ == "kernels":
    # Imported as a top-level `kernels` because a checkout's root is on sys.path. That name
    # belongs to Hugging Face's `kernels` package, which transformers probes for; look like
    # an empty namespace (no __file__) so the probe reports it absent instead of importing us.
    del __file__  # noqa: F821
else:
    from compressor.kernels.quant_linear import QuantLinear

    __all__ = ["QuantLinear"]
