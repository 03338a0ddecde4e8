"""Evaluation: held-out perplexity and size accounting (installed as ``compressor.evaluation``)."""
