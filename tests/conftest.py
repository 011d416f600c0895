"""Test configuration: one intra-op thread (small ops are ~50x slower with 2 threads on CI machines)."""

import torch

torch.set_num_threads(1)
