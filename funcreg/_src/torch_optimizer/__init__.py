"""torch_optimizer."""
