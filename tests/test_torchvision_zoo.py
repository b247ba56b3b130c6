"""Real torchvision architectures (random weights, small inputs) under both kinds of masks.

A representative subset of the zoo, one model per family trait: residual links (resnet), concatenation
(densenet, squeezenet, inception), depthwise convolutions with squeeze-excitation and stochastic depth
(mobilenet_v3, efficientnet), grouped convolutions (regnet), channel shuffles (shufflenet), LayerNorm2d
(convnext), a segmentation head with its auxiliary classifier (lraspp, fcn), frozen BatchNorm. The
whole zoo runs in ``benchmarks/torchvision_zoo.py``.
"""


import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from speedup.groups import consistent_masks  # noqa: E402
from support.checks import check_speedup, output_channel_masks  # noqa: E402

# name -> (builder, input size, parameter ratio under consistent masks at most). The classifier keeps its
# outputs, so models whose classifier is a large share of their parameters stay above a quarter.
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), 64, 0.3),
    "resnet18_frozen_bn": (lambda: torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), 64, 0.3),
    "densenet121": (lambda: torchvision.models.densenet121(), 64, 0.3),
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(), 64, 0.4),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), 64, 0.4),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), 64, 0.35),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(), 64, 0.35),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(), 64, 0.45),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 64, 0.3),
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True), 64, 0.35),
    "lraspp_mobilenet_v3_large": (lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights_backbone=None), 64, 0.35),
}


def randomized(model: nn.Module) -> nn.Module:
    """Random running statistics and shifts, so masked channels carry non-zero constants to fold."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "running_mean") and module.running_mean is not None:
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model.eval()


def per_layer_masks(model: nn.Module) -> dict:
    """Masks (a): half the output channels of every conv/linear but the classifier, at random per layer."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = {n for n in names if n.endswith(("fc", "classifier.1", "classifier.3", "classifier.2", "head",
                                             "low_classifier", "high_classifier", "aux1.fc2", "aux2.fc2"))}
    return output_channel_masks(model, [n for n in names if n not in last and n != names[-1]])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_channels_of_every_layer(name):
    build, size, _ = MODELS[name]
    torch.manual_seed(0)
    model = randomized(build())
    report = check_speedup(model, per_layer_masks(model), torch.randn(1, 3, size, size),
                           torch.randn(2, 3, size, size))
    assert report.params_after < report.params_before
    assert not report.barriers, report.barriers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_consistent_channels_go_everywhere(name):
    build, size, ratio = MODELS[name]
    torch.manual_seed(0)
    model = randomized(build())
    dummy = torch.randn(1, 3, size, size)
    report = check_speedup(model, consistent_masks(model, dummy), dummy, torch.randn(2, 3, size, size),
                           max_param_ratio=ratio)
    assert not report.barriers, report.barriers
