"""Benchmark: speedup on detectors (Ultralytics YOLO, RT-DETR) and diffusion models (``diffusers``),
under two kinds of 50% masks, where those packages are installed (neither is a dependency).

A sweep for generality, as ``timm_models`` and ``hf_architectures`` are: models pruned in practice
and built nowhere else in the suite, from their configs (random weights, nothing downloaded):

* Ultralytics (``pip install ultralytics``): detection, segmentation, pose, oriented boxes and
  classification YOLOs from v5 to 26, YOLO-World (text-guided attention) and RT-DETR (deformable
  attention, top-k query selection), on 160 x 160 images; denormals are flushed (their random
  weights make the forward pass many times slower otherwise);
* ``diffusers`` (``pip install diffusers``): UNet2DModel, UNet2DConditionModel (cross-attention),
  AutoencoderKL and DiT, tiny configs, their zero-initialised parameters and norms randomised so that
  outputs depend on every layer;
* masks ``a``: a random half of the output channels of every ``Linear`` / ``Conv2d``; masks ``b``:
  ``speedup.groups.consistent_masks(model, dummy, sparsity=0.5)``; compared with the masked model on a
  fresh input of batch 2.

Usage::

    bash dev.sh bench detection_and_diffusion                 # what is installed (a few minutes)
    bash dev.sh bench detection_and_diffusion --models yolov8n,unet2d --masks b

Rows go to ``benchmarks/results/detection_and_diffusion.json`` (``--json PATH`` to put them elsewhere).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import random_channel_masks, randomize_batchnorm, randomize_zero_parameters  # noqa: E402
from _sweep import sweep_main, sweep_row  # noqa: E402

from speedup.groups import consistent_masks  # noqa: E402

YOLO_CONFIGS = """yolov8n yolov8n-seg yolov8n-pose yolov8n-obb yolov8n-cls yolo11n yolo11n-seg yolov5nu yolov6n yolov9t
yolov10n yolo12n yolov8n-world rtdetr-l yolo26n""".split()
Inputs = Callable[[int, torch.Generator], tuple]


def _ultralytics(config: str) -> tuple[nn.Module, Inputs]:
    from ultralytics import RTDETR, YOLO

    torch.set_flush_denormal(True)
    model = (RTDETR if config.startswith("rtdetr") else YOLO)(config + ".yaml").model.eval()
    randomize_batchnorm(model, seed=1)
    return model, lambda batch, generator: (torch.randn(batch, 3, 160, 160, generator=generator),)


class _FirstOutput(nn.Module):
    """A ``diffusers`` model returning its first output as a tensor (``return_dict=False``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs, return_dict=False)[0]


def _diffusers(name: str) -> tuple[nn.Module, Inputs]:
    import diffusers

    blocks = dict(layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8)
    steps = lambda batch: torch.tensor([10] * batch)  # noqa: E731
    if name == "unet2d":
        model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, down_block_types=(
            "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), **blocks)
        inputs = lambda b, g: (torch.randn(b, 3, 16, 16, generator=g), steps(b))  # noqa: E731
    elif name == "unet2d_cond":
        model = diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8, **blocks)
        inputs = lambda b, g: (torch.randn(b, 4, 16, 16, generator=g), steps(b),  # noqa: E731
                               torch.randn(b, 5, 32, generator=g))
    elif name == "vae":
        model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                        latent_channels=4, norm_num_groups=8, sample_size=16)
        inputs = lambda b, g: (torch.randn(b, 3, 16, 16, generator=g),)  # noqa: E731
    else:
        model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        inputs = lambda b, g: (torch.randn(b, 4, 8, 8, generator=g), steps(b), torch.tensor([1] * b))  # noqa: E731
    generator = torch.Generator().manual_seed(3)
    randomize_zero_parameters(model, generator, 0.05)  # zero-initialised output layers and gates
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.GroupNorm) and norm.affine:
                norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=generator))
                norm.bias.copy_(0.2 * torch.randn(norm.bias.shape, generator=generator))
    return _FirstOutput(model.eval()).eval(), inputs


BUILDERS: dict[str, Callable[[], tuple[nn.Module, Inputs]]] = {}
if importlib.util.find_spec("ultralytics") is not None:
    BUILDERS.update({config: (lambda c=config: _ultralytics(c)) for config in YOLO_CONFIGS})
if importlib.util.find_spec("diffusers") is not None:
    BUILDERS.update({name: (lambda n=name: _diffusers(n)) for name in ("unet2d", "unet2d_cond", "vae", "dit")})


def bench(name: str, kind: str) -> dict:
    def prepare() -> tuple[nn.Module, dict, Any, Any]:
        torch.manual_seed(0)
        model, inputs = BUILDERS[name]()
        generator = torch.Generator().manual_seed(5)
        dummy, fresh = inputs(1, generator), inputs(2, generator)
        masks = random_channel_masks(model) if kind == "a" else consistent_masks(model, dummy, sparsity=0.5, seed=0)
        return model, masks, dummy, fresh

    return sweep_row(name, kind, prepare)


def main(argv: Optional[list[str]] = None) -> int:
    if not BUILDERS:
        print("neither ultralytics nor diffusers is installed: pip install ultralytics diffusers")
        return 1
    versions = {package: __import__(package).__version__ for package in ("ultralytics", "diffusers")
                if importlib.util.find_spec(package) is not None}
    return sweep_main(argv, __doc__.split("\n\n")[0], list(BUILDERS), bench, "detection_and_diffusion",
                      "speedup on detectors and diffusion models (configs, random weights; a/b = after / before)",
                      versions)


if __name__ == "__main__":
    sys.exit(main())
