"""The example from README.md, verbatim between the markers, so CI checks that it runs.

.ci/run also checks that README.md's first Python block appears here unchanged. It takes well under
a second, so ``--quick`` is accepted and changes nothing.

    python examples/readme_example.py [--quick]
"""

import argparse

import torch

torch.set_num_threads(1)  # small ops are much slower with several threads on small machines

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="accepted for CI; the example is already quick")
parser.parse_args()

# --- README example begins ---
import torch
from torch.func import functional_call, grad

import funcreg as fr

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
x = torch.randn(256, 8)
y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)

params = fr.params_of(model)  # {"0.weight": ..., "0.bias": ..., "2.weight": ..., "2.bias": ...}
mask = fr.decay_mask(model)  # weights yes, biases and norm layers no
print(mask)  # the rule, printed: name, shape, decision, reason
tx = fr.chain(
    fr.add_decayed_weights(1e-2, mask=mask),  # coupled L2, = torch's SGD(weight_decay=1e-2) on weights only
    fr.sgd(0.1, momentum=0.9),
)
state = tx.init(params)


def loss_fn(params, x, y):
    return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)


for _step in range(200):
    grads = grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    params = fr.apply_updates(params, updates)
print(f"final loss {loss_fn(params, x, y):.4f}")
# --- README example ends ---
