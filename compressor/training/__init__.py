"""Training on top of compressed models: what trains, the loop, and its checkpoints."""
