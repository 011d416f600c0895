"""Low-memory optimizer state: moments stored in bfloat16 (rounded stochastically), or in 8 bits per
entry (float8 codes with one float32 scale per block)."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.utils._pytree as pytree

from funcreg._src.core.base import GradientTransformation, configured, expect_state
from funcreg._src.core.donation import donating, donation
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


class Float8Blocks(NamedTuple):
    """A float32 tensor in 8 bits per entry: ``codes`` (float8 e4m3, the tensor's shape) times the
    ``scale`` of its block (float32, one per ``block`` consecutive entries of the flattened tensor)."""

    codes: torch.Tensor
    scale: torch.Tensor


_E4M3_MAX = 448.0  # the largest finite float8 e4m3 value


def quantize_float8_blocks(x: torch.Tensor, block: int = 256) -> Float8Blocks:
    """``x`` (float32) as :class:`Float8Blocks`: each block of ``block`` entries scaled so that its
        largest magnitude is float8 e4m3's largest value (448), then rounded to the nearest float8. An
    entry of magnitude at least ``2**-6 / 448`` (about 3.5e-5) of its block's largest keeps a relative
    error of at most ``2**-4`` (3 mantissa bits); smaller ones are float8 subnormals, with an absolute
    error of at most ``2**-10 / 448`` of the block's largest. Non-finite entries decode as NaN.

        Examples:
            >>> import torch
            >>> from funcreg._src.combinators.low_memory import dequantize_float8_blocks, quantize_float8_blocks
            >>> x = torch.tensor([1.0, -0.3, 0.02, 448.0])
            >>> dequantize_float8_blocks(quantize_float8_blocks(x, block=2), block=2)
            tensor([ 1.0000e+00, -2.8571e-01,  1.9531e-02,  4.4800e+02])
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_float8_blocks expects float32, got {x.dtype}")
    flat = x.reshape(-1)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, math.ceil(n / block) * block - n)).view(-1, block)
    finite = torch.where(torch.isfinite(padded), padded, torch.zeros_like(padded))
    absmax = finite.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / _E4M3_MAX, torch.ones_like(absmax))
    # non-finite entries as NaN: the float8 cast saturates an infinity to 448 (a finite value)
    scaled = torch.where(torch.isfinite(padded), padded / scale[:, None], torch.full_like(padded, math.nan))
    codes = scaled.to(torch.float8_e4m3fn).view(-1)[:n].view(x.shape)
    return Float8Blocks(codes, scale)


def dequantize_float8_blocks(q: Float8Blocks, block: int = 256) -> torch.Tensor:
    """The float32 tensor that :func:`quantize_float8_blocks` encoded with the same ``block``."""
    codes, scale = q
    flat = codes.reshape(-1).float()
    n = flat.numel()
    if scale.shape != (math.ceil(n / block),):
        raise ValueError(f"{scale.numel()} block scales for {n} entries in blocks of {block}")
    padded = torch.nn.functional.pad(flat, (0, scale.numel() * block - n)).view(-1, block)
    return (padded * scale[:, None]).view(-1)[:n].view(codes.shape)


def compress_state(
    inner: GradientTransformation,
    seed: int = 0,
    format: Literal["bfloat16", "float8"] = "bfloat16",
    block: int = 256,
) -> GradientTransformation:
    """``inner`` with its float32 state tensors (moments, momentum buffers) kept in less memory.

    ``format="bfloat16"``: half their memory. Each update computes in float32 and rounds the new
    state back stochastically (:func:`stochastic_round_to_bfloat16`), so small increments are kept on
    average instead of being lost to round-to-nearest. The rounding noise comes from a generator
    seeded with ``seed`` and the step count: a run is reproducible.

    ``format="float8"``: a quarter of their memory (plus 4 bytes per ``block`` entries), as in the
    8-bit optimizers of the literature (block-wise quantized moments; torchao's ``AdamWFp8`` uses
    the same float8 e4m3 codes with block-wise scales): :class:`Float8Blocks`, rounded to nearest
    (see :func:`quantize_float8_blocks` for the error).

    Scalars (0-d tensors: counts) and non-float32 tensors stay as they are. The updates are float32,
    as the parameters. Eager only (the generator is not traced).

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
    if format not in ("bfloat16", "float8"):
        raise ValueError(f"Invalid format value: {format!r} (expected 'bfloat16' or 'float8')")
    check_int("block", block, low=1)

    def one(x: torch.Tensor, generator: torch.Generator | None) -> Any:
        if format == "float8":
            return quantize_float8_blocks(x, block)
        return stochastic_round_to_bfloat16(x, generator) if generator is not None else x.to(torch.bfloat16)

    def compress(leaves: list[Any], spec: Any, generator: torch.Generator | None) -> Any:
        """The state of ``leaves`` compressed; each float32 leaf is dropped from the list as soon as
        its compressed form exists, so the float32 state is freed tensor by tensor (peak memory)."""
        out = []
        for i, x in enumerate(leaves):
            leaves[i] = None
            out.append(
                one(x, generator)
                if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim > 0
                else x
            )
            del x
        return unflatten(out, spec)

    def decompress(state: Any, donated: bool) -> Any:
        """float32 copies of the compressed tensors; the others as they are when the caller donated
        the state, else copied too (the inner step then writes only into tensors of its own)."""
        given = {id(x) for x in flatten(state)[0] if isinstance(x, torch.Tensor)}
        if format == "float8":
            state = _float8_decompressed(state, block)
        leaves, spec = flatten(state)
        out = []
        for x in leaves:
            if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
                x = x.float()
            elif isinstance(x, torch.Tensor) and not donated and id(x) in given:
                x = x.clone()
            out.append(x)
        return unflatten(out, spec)

    def init(params: PyTree) -> CompressedState:
        return CompressedState(init_count(params), compress(*flatten(inner.init(params)), None))

    def update(
        updates: PyTree, state: CompressedState, params: PyTree | None = None
    ) -> tuple[PyTree, CompressedState]:
        expect_state(state, CompressedState, "compress_state")
        if torch._C._functorch.is_functorch_wrapped_tensor(state.count) or compiling():
            raise TypeError(
                "compress_state runs eagerly only: its rounding generator is not traced (the state is "
                "wrapped by vmap or grad, or torch.compile is tracing)"
            )
        # the inner step runs donated on the float32 copies, which are this step's own: it updates the
        # moments in place instead of allocating new ones beside the copies (the step's peak memory)
        own = decompress(state.inner_state, donating())
        with donation(True):
            new_updates, inner_state = inner.update(updates, own, params)
        del own
        device = state.count.device
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(state.count))
        leaves, spec = flatten(inner_state)
        del inner_state  # the list holds the float32 state alone now: compress frees it as it goes
        return new_updates, CompressedState(state.count + 1, compress(leaves, spec, generator))

    shown = {} if format == "bfloat16" else {"format": format, "block": block}
    return configured(GradientTransformation(init, update), "compress_state", inner, seed=seed, **shown)


def _float8_decompressed(state: Any, block: int) -> Any:
    """``state`` with every :class:`Float8Blocks` decoded to its float32 tensor."""
    return pytree.tree_map(
        lambda x: dequantize_float8_blocks(x, block) if isinstance(x, Float8Blocks) else x,
        state,
        is_leaf=lambda x: isinstance(x, Float8Blocks),
    )
