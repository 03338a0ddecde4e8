"""Evaluation (installed as ``compressor.evaluation``): the quick held-out perplexity, the lm-eval
runner with built-in offline tasks, size accounting, the results cache, report and plot."""
