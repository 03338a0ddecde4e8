"""Calibration data: sources, tokenization, packing, caching (installed as ``compressor.calibration``)."""
