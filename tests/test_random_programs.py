"""Random programs (``support.random_programs``) sped up under random and consistent masks.

Each must come out equal to its masked model on a fresh input, with no barrier; consistent masks
must leave fewer parameters. The seeds are fixed: a failure names the program that shows it.
"""

import random

import pytest
import torch

import speedup
from speedup.groups import consistent_masks
from speedup.testing import assert_same_outputs, masked_copy, parameter_count
from support.checks import randomize_norms
from support.random_programs import ImageProgram, TokenProgram, random_output_masks

PROGRAMS = {
    "image": (ImageProgram, lambda batch: torch.randn(batch, 3, 16, 16)),
    "tokens": (TokenProgram, lambda batch: torch.randint(0, 50, (batch, 10 - batch))),
}
SEEDS = range(48)


@pytest.mark.parametrize("masks", ["random", "consistent"])
@pytest.mark.parametrize("kind", PROGRAMS)
def test_random_programs_equal_their_masked_model(kind, masks):
    build, inputs = PROGRAMS[kind]
    ratios = []
    for seed in SEEDS:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        model = randomize_norms(build(rng), seed).eval()
        dummy = inputs(2)
        chosen = random_output_masks(model, rng) if masks == "random" else consistent_masks(model, dummy, 0.5, seed)
        reference = masked_copy(model, chosen).eval()
        before = parameter_count(model)
        report = speedup.shrink(model, chosen, dummy)
        assert not report.barriers, f"seed {seed}: {report.barriers}"
        assert_same_outputs(reference, model, inputs(3))
        ratios.append(parameter_count(model) / before)
    assert max(ratios) <= 1.0
    assert sum(ratios) / len(ratios) < 0.8, f"the programs kept {sum(ratios) / len(ratios):.0%} of their parameters"
