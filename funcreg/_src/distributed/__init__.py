"""funcreg on ``torch.distributed``: data parallelism, sharded (DTensor) parameters, sharded sweeps.

Modules: ``dtensor`` (the few helpers the core plumbing uses for ``DTensor`` leaves, importable without
initializing anything), ``data_parallel`` (gradient averaging across a process group, built on
``torch.distributed``'s functional collectives) and ``sweep`` (splitting the members of a sweep
across ranks and gathering their results). The public names are in :mod:`funcreg.distributed`.

Nothing here imports ``torch.distributed.tensor`` (a few seconds of import time) unless it is used:
a tensor can only be a ``DTensor`` once that module is loaded.
"""
