"""N:M sparse weights in the compressed layout of torch's semi-structured sparse tensors.

After training with :func:`funcreg.n_m_sparsity` in the proximal form, each block of ``m`` consecutive
entries along a weight's last dimension holds at most ``n`` nonzeros. Such a matrix is stored as its
kept entries (``n`` per block, in order: a ``rows x cols * n / m`` matrix, half the size for 2:4) and
the position of each inside its block: :func:`semi_structured` builds that layout on any device. A
block with fewer than ``n`` nonzeros keeps zeros at some free positions: for 2:4 those that torch's
CUTLASS encoding picks (so the values equal its ``packed`` tensor entry for entry, and the positions
are what its metadata encodes), for other patterns the first free ones. 1:2 values equal torch's
float32 ``packed`` tensor as well. :meth:`SemiStructured.cutlass` gives torch's own
``(packed, meta)`` pair (computed by torch's converter, on the CPU as well), and
:meth:`SemiStructured.to_torch` the ``SparseSemiStructuredTensor`` of
``torch.sparse.to_sparse_semi_structured``, which needs a CUDA device: 2:4 for float16, bfloat16 and
int8, 1:2 for float32 (torch's rules; it checks the shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# per 4-bit pattern of nonzeros (bit i: position i) with at most two set, the two positions kept: the
# nonzeros, and for fewer than two the positions torch's converter encodes (its table of the cases)
_CUTLASS_2_4 = torch.tensor(
    [[2, 3], [0, 2], [1, 2], [0, 1], [2, 3], [0, 2], [1, 2], [0, 0],
     [2, 3], [0, 3], [1, 3], [0, 0], [2, 3], [0, 0], [0, 0], [0, 0]]
)  # fmt: skip
_TORCH_PATTERN = {torch.float16: (2, 4), torch.bfloat16: (2, 4), torch.int8: (2, 4), torch.float32: (1, 2)}


@dataclass(frozen=True)
class SemiStructured:
    """An N:M sparse matrix as its kept entries and their positions; see :func:`semi_structured`.

    Attributes:
        values: ``(rows, cols // m * n)``: the ``n`` kept entries of each block of ``m``, in order.
        indices: ``int8``, the same shape: the position (``0 .. m-1``) of each value in its block,
            increasing within a block.
        shape: the dense shape ``(rows, cols)``.
        n, m: the pattern.

    Examples:
        >>> import torch, funcreg as fr
        >>> s = fr.semi_structured(torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]]))
        >>> s.mask()
        tensor([[False,  True, False,  True],
                [ True, False,  True, False]])
        >>> s.to_dense()
        tensor([[ 0.0000,  1.5000,  0.0000, -2.0000],
                [ 3.0000,  0.0000,  0.0000,  0.0000]])
    """

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, int]
    n: int
    m: int

    def _positions(self) -> torch.Tensor:
        rows, cols = self.shape
        start = torch.arange(cols // self.m, device=self.indices.device).repeat_interleave(self.n) * self.m
        return self.indices.long() + start.view(1, -1)

    def to_dense(self) -> torch.Tensor:
        """The dense matrix (zeros outside the kept positions)."""
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return out.scatter(1, self._positions(), self.values)

    def mask(self) -> torch.Tensor:
        """The kept positions as a boolean matrix of the dense shape (``n`` per block; where a block
        had fewer nonzeros, padded zeros fill free positions, as the module says)."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        return out.scatter(1, self._positions(), torch.ones_like(self.values, dtype=torch.bool))

    def _check_torch(self) -> None:
        want = _TORCH_PATTERN.get(self.values.dtype)
        if want is None or want != (self.n, self.m):
            raise ValueError(
                f"torch's semi-structured format takes 2:4 for float16, bfloat16 and int8 and 1:2 for "
                f"float32; this is {self.n}:{self.m} in {self.values.dtype}"
            )

    def cutlass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's CUTLASS layout ``(packed, meta)``, by torch's own converter (CPU or GPU).

        ``packed`` equals :attr:`values`; ``meta`` is the reordered metadata CUTLASS reads. torch's
        shape rules apply (float16: rows a multiple of 32, columns of 64; it raises otherwise).
        """
        self._check_torch()
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

        return sparse_semi_structured_from_dense_cutlass(self.to_dense())

    def to_torch(self) -> torch.Tensor:
        """``torch.sparse.to_sparse_semi_structured`` of the dense matrix (a CUDA tensor only)."""
        self._check_torch()
        if not self.values.is_cuda:
            raise RuntimeError(
                "torch.sparse.to_sparse_semi_structured needs a CUDA tensor; move the weight first "
                "(fr.semi_structured(w.cuda())) or use .cutlass() for the layout on the CPU"
            )
        return torch.sparse.to_sparse_semi_structured(self.to_dense())


def semi_structured(weight: torch.Tensor, n: int = 2, m: int = 4) -> SemiStructured:
    """The compressed N:M layout of a matrix with at most ``n`` nonzeros in each block of ``m``
    consecutive entries of a row (2:4 by default).

    Raises ``ValueError`` for a tensor that is not 2-d (reshape a convolution kernel with
    ``w.reshape(w.shape[0], -1)``), whose last dimension is not a multiple of ``m``, or that has a
    block with more than ``n`` nonzeros (the message names the first; project onto the pattern with
    :func:`funcreg.n_m_sparsity`'s prox, :func:`funcreg.proxes.keep_n_of_m`).

    Examples:
        >>> import torch, funcreg as fr
        >>> w = torch.tensor([[0.0, -3.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0]])
        >>> s = fr.semi_structured(w)
        >>> s.values, s.indices  # the second block has one nonzero: a zero fills position 2, as in torch
        (tensor([[-3.,  2.,  4.,  0.]]), tensor([[1, 2, 0, 2]], dtype=torch.int8))
        >>> torch.equal(s.to_dense(), w)
        True
    """
    for arg, given in (("n", n), ("m", m)):
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"Invalid {arg} value: {given!r} (expected an int >= 1)")
    if n > m:
        raise ValueError(f"Invalid n value: {n} (at most m = {m})")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"semi_structured: weight must be a tensor, got {type(weight).__name__}")
    if weight.ndim != 2 or weight.shape[1] % m:
        raise ValueError(
            f"semi_structured: expected a matrix whose rows are a multiple of {m} long, got shape "
            f"{tuple(weight.shape)} (reshape a kernel with w.reshape(w.shape[0], -1))"
        )
    w = weight.detach()
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // m, m)
    nonzero = blocks != 0
    counts = nonzero.sum(dim=-1)
    if bool((counts > n).any()):
        r, b = (int(i) for i in torch.nonzero(counts > n)[0])
        raise ValueError(
            f"semi_structured: row {r}, block {b} (columns {b * m}..{b * m + m - 1}) has {int(counts[r, b])} "
            f"nonzeros, more than {n} of {m}; project first (fr.proxes.keep_n_of_m(w, {n}, {m}))"
        )
    if (n, m) == (2, 4):  # the positions torch's CUTLASS encoding gives (padded zeros included)
        bits = (nonzero.to(torch.int64) << torch.arange(4, device=w.device)).sum(dim=-1)
        positions = _CUTLASS_2_4.to(w.device)[bits]
    else:  # the nonzeros first, then the free positions, each in order; keep n, in increasing position
        key = (~nonzero).to(torch.int64) * m + torch.arange(m, device=w.device)
        positions = key.argsort(dim=-1)[..., :n].sort(dim=-1).values
    values = blocks.gather(-1, positions).reshape(rows, -1)
    return SemiStructured(values, positions.to(torch.int8).reshape(rows, -1), (rows, cols), n, m)
