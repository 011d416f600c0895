"""fr.semi_structured: the compressed N:M layout against its definition, and against torch's own
CUTLASS converter (pure PyTorch, so it runs on the CPU); the real SparseSemiStructuredTensor needs CUDA.

Matrices are drawn with numpy (never torch's global RNG) and projected onto the pattern with
fr.proxes.keep_n_of_m, with extra zeros so that blocks with fewer than n nonzeros occur.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr


def n_m_matrix(
    rng: np.random.Generator, rows: int, cols: int, n: int, m: int, dtype: torch.dtype
) -> torch.Tensor:
    w = torch.from_numpy(rng.normal(size=(rows, cols)) * (rng.random((rows, cols)) > 0.3))
    return fr.proxes.keep_n_of_m(w, n, m).to(dtype)


@settings(deadline=None, max_examples=60, suppress_health_check=SLOW_OK)
@given(
    st.integers(1, 4).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m))),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_the_layout_holds_the_kept_entries_in_order_with_their_positions(nm, rows, blocks, seed) -> None:  # noqa: ANN001
    n, m = nm
    w = n_m_matrix(np.random.default_rng(seed), rows, blocks * m, n, m, torch.float64)
    s = fr.semi_structured(w, n, m)
    assert s.values.shape == (rows, blocks * n) and s.indices.dtype == torch.int8
    assert torch.equal(s.to_dense(), w)
    mask = s.mask()
    assert torch.equal(mask.view(rows, blocks, m).sum(dim=-1), torch.full((rows, blocks), n))
    assert bool(mask[w != 0].all())  # every nonzero is kept
    for r in range(rows):
        for b in range(blocks):
            idx = s.indices[r, b * n : (b + 1) * n].long()
            assert bool((idx[1:] > idx[:-1]).all()) and bool(((idx >= 0) & (idx < m)).all())
            block = w[r, b * m : (b + 1) * m]
            assert torch.equal(s.values[r, b * n : (b + 1) * n], block[idx])
            nz = torch.nonzero(block).view(-1).tolist()
            if (n, m) == (2, 4):  # torch's CUTLASS table for blocks with fewer than two nonzeros
                padded = {(): [2, 3], (0,): [0, 2], (1,): [1, 2], (2,): [2, 3], (3,): [2, 3]}
                assert idx.tolist() == (nz if len(nz) == 2 else padded[tuple(nz)])
            else:  # zeros fill the first free positions
                free = [i for i in range(m) if i not in nz]
                assert idx.tolist() == sorted(nz + free[: n - len(nz)])


@pytest.mark.parametrize(
    ("dtype", "n", "m"), [(torch.float16, 2, 4), (torch.bfloat16, 2, 4), (torch.float32, 1, 2)]
)
def test_values_are_torch_cutlass_packed_tensor_and_its_meta_decodes_to_the_matrix(dtype, n, m) -> None:  # noqa: ANN001
    w = n_m_matrix(np.random.default_rng(0), 32, 64, n, m, dtype)
    w[0, :8] = 0  # blocks without nonzeros
    s = fr.semi_structured(w, n, m)
    packed, meta = s.cutlass()
    assert torch.equal(packed, s.values) and meta.dtype == torch.int16
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    dense = sparse_semi_structured_to_dense_cutlass(packed, meta)
    assert torch.equal(dense != 0, w != 0)
    torch.testing.assert_close(dense, w, atol=1e-4, rtol=1e-3)  # torch decodes float32 through a product


def test_patterns_and_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"row 1, block 0 \(columns 0..3\) has 3 nonzeros, more than 2 of 4"):
        fr.semi_structured(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]))
    with pytest.raises(ValueError, match=r"a matrix whose rows are a multiple of 4 long, got shape \(2, 3\)"):
        fr.semi_structured(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"reshape a kernel"):
        fr.semi_structured(torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match=r"torch's semi-structured format takes 2:4 for float16"):
        fr.semi_structured(torch.zeros(32, 64), 2, 4).cutlass()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_to_torch_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match=r"needs a CUDA tensor"):
        fr.semi_structured(torch.zeros(32, 64, dtype=torch.float16)).to_torch()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.sparse.to_sparse_semi_structured needs CUDA")
def test_to_torch_is_torch_semi_structured_tensor_on_cuda() -> None:  # pragma: no cover - GPU only
    w = n_m_matrix(np.random.default_rng(1), 64, 128, 2, 4, torch.float16).cuda()
    sparse = fr.semi_structured(w).to_torch()
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(128, 16))).half().cuda()
    torch.testing.assert_close(sparse @ x, w @ x, atol=1e-2, rtol=1e-2)


def test_an_n_m_sparsity_prox_exports() -> None:
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.normal(size=(4, 8)))
    z = fr.n_m_sparsity(2, 4).prox({"w": w}, step=0.1)["w"]
    s = fr.semi_structured(z)
    assert torch.equal(s.to_dense(), z) and s.values.shape == (4, 4)


def test_every_2_4_block_pattern_keeps_the_positions_torch_cutlass_encodes() -> None:
    """All 11 patterns of at most two nonzeros in a block of four, against torch's own converter: its
    metadata, read back by filling the packed tensor with distinct markers and decoding, puts each
    kept value (padded zeros included) where ``indices`` says."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    patterns = [bits for bits in range(16) if bin(bits).count("1") <= 2]
    assert len(patterns) == 11
    rng = np.random.default_rng(7)
    rows, blocks = 32, 16
    w = torch.zeros(rows, blocks * 4, dtype=torch.float16)
    for r in range(rows):
        for b in range(blocks):
            bits = patterns[(r * blocks + b + r) % len(patterns)]
            for i in range(4):
                if bits >> i & 1:
                    w[r, 4 * b + i] = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0))
    s = fr.semi_structured(w)
    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(s.values, packed)
    markers = torch.arange(1, packed.numel() + 1, dtype=torch.float16).reshape(packed.shape)
    where_torch_puts_them = sparse_semi_structured_to_dense_cutlass(markers, meta)
    ours = fr.SemiStructured(markers, s.indices, s.shape, 2, 4)
    assert torch.equal(ours.to_dense(), where_torch_puts_them)
    assert torch.equal(s.mask(), where_torch_puts_them != 0)


@pytest.mark.parametrize(
    ("dtype", "n", "m"),
    [(torch.float16, 2, 4), (torch.bfloat16, 2, 4), (torch.int8, 2, 4), (torch.float32, 1, 2)],
)
def test_torch_patterns_are_accepted_for_their_dtype_and_others_refused(dtype, n, m) -> None:  # noqa: ANN001
    w = torch.zeros(32, 64, dtype=dtype)
    w[:, ::m] = 3  # one nonzero per block of m
    packed, _ = fr.semi_structured(w, n, m).cutlass()
    assert torch.equal(packed, fr.semi_structured(w, n, m).values)
    other = (1, 2) if (n, m) == (2, 4) else (2, 4)
    with pytest.raises(ValueError, match=rf"this is {other[0]}:{other[1]} in {dtype}"):
        fr.semi_structured(w, *other).cutlass()
