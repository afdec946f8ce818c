"""The training core shared by heads and baselines: frame readers, the loop, pooling, folds and the run directory."""
