"""Named optimizers as chains equal to ``torch.optim``, schedule-free optimizers, the optimizer
table and the transform built from a name."""
