"""Slicing parameters to their kept entries: the same result whatever way the gather takes."""

from __future__ import annotations

import pytest
import torch

from speedup.slicing import gather_kept


def _reference(tensor: torch.Tensor, kept: list) -> torch.Tensor:
    for d, k in enumerate(kept):
        if k is not None:
            tensor = tensor.index_select(d, k)
    return tensor


@pytest.mark.parametrize("shape, dims", [
    ((9, 6), (0, 1)),
    ((9, 6, 3, 3), (0, 1)),
    ((9, 6, 3, 3), (1,)),
    ((3000, 1024), (0, 1)),  # rows of 4 KB, more than a 4 MB slab of them kept: gathered slab by slab
    ((2500, 64, 3, 3), (0, 1, 3)),
])
def test_gather_kept_selects_the_kept_entries_of_every_dimension(shape, dims):
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(shape, generator=generator)
    kept = [(torch.rand(n, generator=generator) > 0.3).nonzero().reshape(-1) if d in dims else None
            for d, n in enumerate(shape)]
    result = gather_kept(tensor, kept)
    assert torch.equal(result, _reference(tensor, kept))
    assert result.is_contiguous()
