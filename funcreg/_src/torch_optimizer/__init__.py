"""``TorchOptimizer``, a real ``torch.optim.Optimizer`` running funcreg transforms per param group,
its torch-format state, and ``create_optimizer``."""
