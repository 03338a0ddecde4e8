"""Model merging: streamed tensor I/O, parameter resolution, the merge engine, mergekit configs."""
