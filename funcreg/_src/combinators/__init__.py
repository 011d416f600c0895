"""Transforms made of transforms: chains and partitions, masks and finite-checks, accumulation,
cautious updates, weight averages, hyperparameters as state, compressed state."""
