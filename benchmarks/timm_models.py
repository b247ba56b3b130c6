"""Benchmark: speedup on timm architectures nobody tuned it for, under two kinds of 50% masks.

A sweep for generality, not for speed: does every architecture give the masked model's outputs, and
how far does each shrink? For each model (random weights, ``timm.create_model(name,
pretrained=False)``, eval mode; BatchNorm statistics randomised; parameters that timm initialises to
zero, as the last gain of a residual branch or a classifier, given N(0, 0.02) so that no branch hides):

* masks ``a``: a random half of the output channels of every ``Conv2d`` / ``Linear`` except the
  classifier (``model.get_classifier()``), with their biases;
* masks ``b``: ``speedup.groups.consistent_masks(model, dummy, sparsity=0.5)``;
* ``speedup.shrink(model, masks, dummy)`` with a dummy of batch 1 at the model's input size, then the
  outputs of the sped-up and the masked model on a FRESH batch of 2, compared with the product's
  tolerance (:func:`speedup.engine.closeness`).

One row per model and kind of masks: status (``ok``, ``MISMATCH``, or the error), largest absolute
difference, parameter and FLOPs ratios, calls kept whole for verification, barriers and the call's
time. Summary lines give the models that passed and the median ratios under masks ``b``.

Usage::

    bash dev.sh bench timm_models                          # the 71 default architectures (about 10 min on 2 cores)
    bash dev.sh bench timm_models --models resnet18d,pvt_v2_b0 --masks b

Rows go to ``benchmarks/results/timm_models.json`` (``--json PATH`` to put them elsewhere).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import random_channel_masks, randomize_batchnorm, randomize_zero_parameters  # noqa: E402
from _sweep import sweep_main, sweep_row  # noqa: E402

from speedup.groups import consistent_masks  # noqa: E402

MODELS = """
resnet18d resnet50_gn seresnext26d_32x4d skresnet18 resnest14d regnetx_002 regnety_002 rexnet_100 mobilenetv3_large_100
mobilenetv4_conv_small efficientnetv2_rw_t tf_efficientnet_lite0 mixnet_s fbnetc_100 lcnet_050 ghostnetv2_100
cspresnet50 cspdarknet53 dpn68 xception41 inception_v4 ese_vovnet19b_dw selecsls42b hrnet_w18_small_v2 dla46_c
tresnet_m repvgg_a0 mobileone_s0 fastvit_t8 efficientformer_l1 efficientformerv2_s0 levit_128s pit_ti_224
deit_tiny_patch16_224 cait_xxs24_224 coat_lite_tiny convit_tiny crossvit_tiny_240 pvt_v2_b0 poolformer_s12
resmlp_12_224 mixer_s32_224 gmlp_ti16_224 mobilevit_xxs mobilevitv2_050 edgenext_xx_small coatnet_nano_rw_224
maxvit_nano_rw_256 swin_tiny_patch4_window7_224 nf_resnet26 regnetz_b16 gernet_s resnetv2_50x1_bit
eva02_tiny_patch14_224 sequencer2d_s tnt_s_patch16_224 visformer_tiny hgnetv2_b0 inception_next_tiny repghostnet_050
efficientvit_b0 efficientvit_m0 tiny_vit_5m_224 davit_tiny focalnet_tiny_srf gcvit_xxtiny rdnet_tiny starnet_s1
hiera_tiny_224 convnext_atto_rms eca_nfnet_l0
""".split()

def build(name: str, seed: int = 3) -> nn.Module:
    model = timm.create_model(name, pretrained=False).eval()
    randomize_batchnorm(model, seed=1)
    randomize_zero_parameters(model, torch.Generator().manual_seed(seed), 0.02)
    return model


def bench(name: str, kind: str) -> dict:
    def prepare():
        model = build(name)
        size = timm.data.resolve_data_config({}, model=model)["input_size"]
        generator = torch.Generator().manual_seed(5)
        dummy, fresh = torch.randn(1, *size, generator=generator), torch.randn(2, *size, generator=generator)
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        heads = [head] if isinstance(head, nn.Module) else []
        masks = random_channel_masks(model, heads) if kind == "a" else consistent_masks(model, dummy, sparsity=0.5, seed=0)
        return model, masks, dummy, fresh

    return sweep_row(name, kind, prepare)


def main(argv: Optional[list[str]] = None) -> int:
    torch.manual_seed(0)
    return sweep_main(argv, __doc__.split("\n\n")[0], MODELS, bench, "timm_models",
                      "speedup on timm models (random weights; a/b = after / before)", {"timm": timm.__version__})


if __name__ == "__main__":
    sys.exit(main())
