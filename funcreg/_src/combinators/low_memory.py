"""Low-memory optimizer state: moments stored in bfloat16, rounded stochastically."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcreg._src.core.base import GradientTransformation, configured, expect_state
from funcreg._src.core.donation import donation
from funcreg._src.core.steps import init_count
from funcreg._src.core.tree import compiling, flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_int


class CompressedState(NamedTuple):
    """State of :func:`compress_state`: ``count`` (0-d int64, the stochastic rounding's stream) and
    the inner state with its float32 tensors stored as bfloat16."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    inner_state: Any


def stochastic_round_to_bfloat16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32) as bfloat16, rounded up or down at random with the probabilities that make the
    rounding unbiased: ``E[round(x)] = x``. Adds 16 random low bits to the float32 pattern and drops
    them (the bfloat16 is the top half of the float32).

    Examples:
        >>> import torch
        >>> from funcreg._src.combinators.low_memory import stochastic_round_to_bfloat16
        >>> x = torch.full((100_000,), 1.0 + 2**-9)  # a quarter of the way from 1 to the next bfloat16
        >>> r = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(0)).float()
        >>> sorted(set(r.tolist())), round(float(r.mean()), 3)
        ([1.0, 1.0078125], 1.002)
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bfloat16 expects float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # 0xFFFF0000: keep sign, exponent and the top 7 mantissa bits
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x).to(torch.bfloat16)


def compress_state(inner: GradientTransformation, seed: int = 0) -> GradientTransformation:
    """``inner`` with its float32 state tensors (moments, momentum buffers) kept in bfloat16: half
    their memory. Each update computes in float32 and rounds the new state back stochastically
    (:func:`stochastic_round_to_bfloat16`), so small increments are kept on average instead of being
    lost to round-to-nearest. The rounding noise comes from a generator seeded with ``seed`` and the
    step count: a run is reproducible. Scalars (0-d tensors: counts) and non-float32 tensors stay as
    they are. The updates are float32, as the parameters. Eager only (the generator is not traced).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.compress_state(fr.adam(1e-3))
        >>> state = tx.init({"w": torch.zeros(3)})
        >>> sorted({str(x.dtype) for x in torch.utils._pytree.tree_leaves(state) if x is not None and x.ndim})
        ['torch.bfloat16']
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"compress_state expects a GradientTransformation, got {type(inner).__name__}")
    check_int("seed", seed, low=0)

    def compress(state: Any, generator: torch.Generator | None) -> Any:
        leaves, spec = flatten(state)
        out = [
            (stochastic_round_to_bfloat16(x, generator) if generator is not None else x.to(torch.bfloat16))
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim > 0
            else x
            for x in leaves
        ]
        return unflatten(out, spec)

    def decompress(state: Any) -> Any:
        leaves, spec = flatten(state)
        return unflatten(
            [x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x for x in leaves],
            spec,
        )

    def init(params: PyTree) -> CompressedState:
        return CompressedState(init_count(params), compress(inner.init(params), None))

    def update(
        updates: PyTree, state: CompressedState, params: PyTree | None = None
    ) -> tuple[PyTree, CompressedState]:
        expect_state(state, CompressedState, "compress_state")
        if torch._C._functorch.is_functorch_wrapped_tensor(state.count) or compiling():
            raise TypeError(
                "compress_state runs eagerly only: its rounding generator is not traced (the state is "
                "wrapped by vmap or grad, or torch.compile is tracing)"
            )
        with donation(False):  # the float32 copies are temporaries: nothing to write in place
            new_updates, inner_state = inner.update(updates, decompress(state.inner_state), params)
        device = state.count.device
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(state.count))
        return new_updates, CompressedState(state.count + 1, compress(inner_state, generator))

    return configured(GradientTransformation(init, update), "compress_state", inner, seed=seed)
