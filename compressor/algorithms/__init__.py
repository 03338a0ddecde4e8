"""The math of compression: quantization grids, RTN, GPTQ."""
