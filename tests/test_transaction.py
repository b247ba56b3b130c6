"""Masks: what a mask keeps (its pattern), and zeroing masked entries in place and undoing it exactly."""

from __future__ import annotations

import pytest
import torch

from speedup.masks import mask_pattern
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
        # Rows times columns, but not every kernel tap: not separable, its taps read from the mask.
        "taps": (rows.view(-1, *line[1:]) & cols.view(1, -1, *line[2:])).expand(shape).contiguous()
        & (torch.arange(shape[-1]) != 0).expand(shape),
    }


@pytest.mark.parametrize("shape", [(9, 6, 3, 3), (9, 6)])
@pytest.mark.parametrize("kind", ["rows", "columns", "rows and columns", "scattered"])
def test_zeroing_masked_entries_is_undone_exactly(shape, kind):
    mask = _masks(shape)[kind]
    weight = torch.randn(shape)
    original = weight.clone()
    tx = Transaction()
    tx.zero_masked(weight, mask_pattern(mask))
    assert torch.equal(weight, original * mask)
    tx.rollback()
    assert torch.equal(weight, original)


@pytest.mark.parametrize("shape", [(9, 6, 3, 3), (9, 6)])
@pytest.mark.parametrize("kind", ["rows", "columns", "rows and columns", "scattered", "taps"])
def test_mask_pattern_answers_what_the_mask_keeps(shape, kind):
    mask = _masks(shape)[kind]
    pattern = mask_pattern(mask)
    for dim in range(len(shape)):
        assert torch.equal(pattern.kept(dim), mask.movedim(dim, 0).reshape(shape[dim], -1).any(1))
    assert torch.equal(pattern.pair, mask.reshape(shape[0], shape[1], -1).any(2))
    outer = pattern.kept(0).reshape(-1, *[1] * (len(shape) - 1)) & pattern.kept(1).reshape(1, -1, *[1] * (len(shape) - 2))
    assert pattern.separable == torch.equal(mask, outer.expand(shape))
    if pattern.dim is not None:
        line = pattern.line.reshape([-1 if d == pattern.dim else 1 for d in range(len(shape))])
        assert torch.equal(mask, line.expand(shape))
    assert (pattern.dim is None) == (kind in ("rows and columns", "scattered", "taps"))
