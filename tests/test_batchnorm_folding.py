"""Folding BatchNorm into the convolution before it: same outputs, fewer layers, nothing else touched."""

import pytest
import torch
from torch import nn

import speedup
from speedup.modules import FoldedConv2d
from speedup.testing import assert_same_outputs, masked_copy
from support.checks import assert_unchanged, output_channel_masks, randomize_norms, state_and_structure


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.side = nn.Conv2d(16, 4, 1)
        self.conv3, self.bn3 = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        # conv2's output is read twice: its BatchNorm cannot absorb the other reader's view of it.
        merged = torch.relu(self.bn2(z)) + z
        out = torch.cat([self.bn3(self.conv3(merged)).mean((2, 3)), self.side(merged).mean((2, 3))], 1)
        return self.fc(out)


def test_folding_after_a_speedup_keeps_outputs_and_removes_the_foldable_norms():
    model = randomize_norms(Net()).eval()
    masks = output_channel_masks(model, ["conv1"])
    reference = masked_copy(model, masks).eval()
    speedup.shrink(model, masks, torch.randn(1, 3, 8, 8))
    assert isinstance(model.conv2, FoldedConv2d)  # bn1's shift on removed channels meets zero padding
    folded = speedup.fold_batchnorm(model, torch.randn(1, 3, 8, 8))
    assert folded == [("conv1", "bn1"), ("conv3", "bn3")]
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn3, nn.Identity)
    assert isinstance(model.bn2, nn.BatchNorm2d)
    assert_same_outputs(reference, model, torch.randn(2, 3, 11, 9))


def test_a_folded_conv_map_of_removed_constants_is_scaled_too():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))).eval()
    masks = output_channel_masks(model, ["0"], with_bias=False)
    reference = masked_copy(model, masks).eval()
    speedup.shrink(model, masks, torch.randn(1, 3, 6, 6))
    assert isinstance(model[3], FoldedConv2d)
    assert speedup.fold_batchnorm(model, torch.randn(1, 3, 6, 6)) == [("0", "1"), ("3", "4")]
    assert_same_outputs(reference, model, torch.randn(2, 3, 7, 5))


def test_training_flags_are_kept_and_a_rejected_input_leaves_the_model_as_it_was():
    model = randomize_norms(Net()).train()
    snapshot = state_and_structure(model)
    with pytest.raises(speedup.TraceError, match="dummy"):
        speedup.fold_batchnorm(model, torch.randn(1, 5, 8, 8))
    assert_unchanged(model, snapshot)
    speedup.fold_batchnorm(model, torch.randn(1, 3, 8, 8))
    assert model.training and model.conv1.training
