"""torchvision's ``VisionTransformer``: its hidden size follows the patch embedding.

The model is traced through (its class token, position embedding, encoder layers and
``nn.MultiheadAttention`` all have rules), but ``_process_input`` reshapes the patch embedding with
the stored ``self.hidden_dim``; once the hidden channels shrink that number must follow. The
class token holds one entry per hidden channel, whatever the stem (a single patchifying conv or a
convolutional stem), so it is where the new size is read.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from speedup.plugins.registry import RuleRegistry


def vision_transformer_sizes(model: nn.Module) -> dict[str, Any]:
    return {"hidden_dim": model.class_token.shape[-1]}


def register(registry: RuleRegistry) -> None:
    registry.add_sizes("torchvision.models.vision_transformer.VisionTransformer", vision_transformer_sizes)
