"""torchvision architectures (tiny configurations, random weights) under both kinds of masks.

(a) half the output channels of every conv/linear but the classifier, at random per layer: many
masked channels carry non-zero constants (biases, norm shifts) that must be folded;
(b) consistent masks from the traced graph: everything masked can go.
Every case is compared with the masked model on a fresh input.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.models import convnext, shufflenetv2, vision_transformer  # noqa: E402

from speedup.groups import consistent_masks  # noqa: E402
from speedup_torchvision.convnext import ConstantAwareLayerNorm2d  # noqa: E402
from support.checks import check_speedup, output_channel_masks, randomize_norms  # noqa: E402


def per_layer_masks(model: nn.Module, seed: int = 0) -> dict:
    """Masks (a): half the rows of every conv/linear except the last one (the classifier)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return output_channel_masks(model, names[:-1], seed=seed)


def randomize_layer_scales(model: nn.Module) -> nn.Module:
    """ConvNeXt's layer scales start at 1e-6; random ones make every block matter in the comparison."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, convnext.CNBlock):
                module.layer_scale.uniform_(0.5, 1.5)
    return model


def tiny_convnext() -> nn.Module:
    settings = [convnext.CNBlockConfig(16, 32, 2), convnext.CNBlockConfig(32, None, 1)]
    model = convnext.ConvNeXt(settings, stochastic_depth_prob=0.1, num_classes=10)
    return randomize_layer_scales(randomize_norms(model)).eval()


def tiny_vit() -> nn.Module:
    model = vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    with torch.no_grad():
        model.class_token.normal_()
    return randomize_norms(model).eval()


def tiny_shufflenet() -> nn.Module:
    model = shufflenetv2.ShuffleNetV2([2, 2, 1], [8, 16, 32, 64, 128], num_classes=10)
    return randomize_norms(model).eval()


MODELS = {"convnext": tiny_convnext, "vit": tiny_vit, "shufflenet": tiny_shufflenet}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_masks_per_layer(name):
    model = MODELS[name]()
    masks = per_layer_masks(model)
    report = check_speedup(model, masks, torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32))
    assert report.params_after < report.params_before
    assert not report.barriers, report.barriers


# Tiny models keep their 3 input channels and their classifier's outputs: about a third is the floor.
@pytest.mark.parametrize("name, ratio", [("convnext", 0.36), ("vit", 0.36), ("shufflenet", 0.4)])
def test_consistent_masks_remove_about_three_quarters(name, ratio):
    model = MODELS[name]()
    dummy = torch.randn(1, 3, 32, 32)
    report = check_speedup(model, consistent_masks(model, dummy), dummy, torch.randn(3, 3, 32, 32),
                           max_param_ratio=ratio)
    assert not report.barriers and not report.kept_for_verification


def test_layer_norm_2d_counts_removed_constant_channels():
    """Channels of a conv masked before a LayerNorm2d hold their bias: removed, but still in the statistics.

    The norm's weight is masked on the same channels, so its outputs there are its shift, folded into
    the next conv.
    """
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), partial(convnext.LayerNorm2d, eps=1e-6)(16),
                          nn.Conv2d(16, 8, 1))
    randomize_norms(model)
    masks = output_channel_masks(model, ["0"], with_bias=False)
    masks["1"] = {"weight": masks["0"]["weight"][:, 0, 0, 0]}
    check_speedup(model, masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7), shrunk=["0.weight", "1.weight"])
    assert isinstance(model[1], ConstantAwareLayerNorm2d)


def test_vision_transformer_hidden_size_follows_the_class_token():
    model = tiny_vit()
    dummy = torch.randn(1, 3, 32, 32)
    report = check_speedup(model, consistent_masks(model, dummy), dummy, torch.randn(2, 3, 32, 32),
                           shrunk=["class_token", "encoder.pos_embedding", "conv_proj.weight"])
    assert model.hidden_dim == model.class_token.shape[-1] < 32
    assert report.attributes["hidden_dim"] == (32, model.hidden_dim)


def test_adaptive_pooling_of_a_channels_last_tensor_is_not_a_barrier():
    """ATen restrides the pooled result to channels-last (``as_strided_``): the same entries."""

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool, self.fc = nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x).contiguous(memory_format=torch.channels_last)
            return self.fc(F.relu(self.pool(y)).flatten(1))

    model = ChannelsLast()
    report = check_speedup(model, output_channel_masks(model, ["conv"]), torch.randn(1, 3, 8, 8),
                           torch.randn(2, 3, 8, 8), shrunk=["conv.weight", "fc.weight"])
    assert not report.barriers
