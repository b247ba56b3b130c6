"""Zeroing masked weights in place and undoing it: every kind of mask comes back exactly."""

from __future__ import annotations

import pytest
import torch

from speedup.masks import single_dimension
from speedup.transaction import Transaction


def _masks(shape: tuple) -> dict:
    rows = torch.arange(shape[0]) % 3 != 0
    cols = torch.arange(shape[1]) % 2 == 0
    line = [1] * len(shape)
    return {
        "rows": rows.view(-1, *line[1:]).expand(shape),
        "columns": cols.view(1, -1, *line[2:]).expand(shape),
        "rows and columns": (rows.view(-1, *line[1:]) & cols.view(1, -1, *line[2:])).expand(shape).contiguous(),
        "scattered": torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5,
    }


@pytest.mark.parametrize("shape", [(9, 6, 3, 3), (9, 6)])
@pytest.mark.parametrize("kind", ["rows", "columns", "rows and columns", "scattered"])
def test_zeroing_masked_entries_is_undone_exactly(shape, kind):
    mask = _masks(shape)[kind]
    weight = torch.randn(shape)
    original = weight.clone()
    tx = Transaction()
    tx.zero_masked(weight, mask, single_dimension(mask))
    assert torch.equal(weight, original * mask)
    tx.rollback()
    assert torch.equal(weight, original)
