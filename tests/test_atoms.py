"""The atom table on its own: what a requirement between atoms keeps."""

import torch

from speedup.atoms import AtomTable


def test_a_kept_atom_keeps_the_atom_it_requires_and_not_the_other_way_round():
    """A norm's output entry requires its input entry: an output entry kept for any reason (here
    pinned) keeps its input entry; an input entry kept alone keeps no output entry."""
    table = AtomTable()
    inputs, outputs = table.fresh(4), table.fresh(4)
    table.require(outputs, inputs)
    table.pin(outputs[:1])
    solution = table.solve()
    keep = solution.pinned.clone()
    keep[solution.primitives(inputs[2:3]).reshape(-1)] = True  # needed by something else
    solution.meet_requirements(keep)

    def kept(atoms):
        return keep[solution.primitives(atoms)].all(1).tolist()

    assert kept(outputs) == [True, False, False, False]
    assert kept(inputs) == [True, False, True, False]


def test_requirements_follow_ties_along_a_chain():
    """Requirements chain (a norm after a norm), and a tie carries them to the tied atoms."""
    table = AtomTable()
    first, second, third, twin = table.fresh(3), table.fresh(3), table.fresh(3), table.fresh(3)
    table.require(third, second)
    table.require(second, first)
    table.tie(first, twin)
    table.pin(third[1:2])
    solution = table.solve()
    keep = solution.pinned.clone()
    solution.meet_requirements(keep)
    for atoms in (first, second, third, twin):
        assert keep[solution.primitives(atoms)].all(1).tolist() == [False, True, False]


def test_a_definition_holding_its_own_atoms_once_tied_is_a_requirement_not_a_cycle():
    """Heads ``h`` merged with the batch and split back by an ``einsum`` are defined as ``h = a and b``
    (``b``: the batch and positions, kept whole), then tied to ``a`` when the result meets the heads
    again: ``h = h and b``. That was a cycle, and every head was pinned; it says only that a kept head
    keeps ``b``, and a head may go alone."""
    table = AtomTable()
    heads, split, whole = table.fresh(4), table.fresh(4), table.fresh(1)
    table.define(heads, torch.stack([split, whole.expand(4)], 1))
    table.tie(split, heads)
    table.pin(whole)
    solution = table.solve()
    assert not bool(solution.pinned[solution.primitives(heads)].all(1).any())  # no head pinned
    keep = solution.pinned.clone()
    keep[solution.primitives(heads[1:3]).reshape(-1)] = True
    solution.meet_requirements(keep)
    assert keep[solution.primitives(heads)].all(1).tolist() == [False, True, True, False]
    assert bool(keep[solution.primitives(whole)].all())
