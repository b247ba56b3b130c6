"""The seed API: NNI's ``ModelSpeedup``, same constructor, same ``speedup_model()``."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .engine import CustomReplacements, shrink
from .masks import MaskSource
from .report import ShrinkReport


class ModelSpeedup:
    """Speeds up ``model`` in place according to ``masks_file``, as NNI's ``ModelSpeedup`` did.

    :param model: the model; ``speedup_model()`` changes it in place and returns it.
    :param dummy_input: a tensor, a tuple/list of positional inputs or a dict of keyword inputs, on
        the model's device. The first dimension (``batch_dim``) is the batch.
    :param masks_file: a dict of masks or the path of one saved with ``torch.save``.
    :param map_location: where mask tensors are loaded, as in ``torch.load``.
    :param batch_dim: the batch dimension of the dummy input.
    :param confidence: kept for compatibility: NNI used it as the batch size of its statistical mask
        inference. Here inference is exact and does not need it.
    :param customized_replace_func: ``{module class or name: fn(module, masks) -> new_module}``.
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        masks_file: MaskSource,
        map_location: Any = None,
        batch_dim: int = 0,
        confidence: int = 8,
        customized_replace_func: Optional[CustomReplacements] = None,
    ):
        self.model = model
        self.dummy_input = dummy_input
        self.masks_file = masks_file
        self.map_location = map_location
        self.batch_dim = batch_dim
        self.confidence = confidence
        self.customized_replace_func = customized_replace_func
        self.report: Optional[ShrinkReport] = None

    def speedup_model(self) -> nn.Module:
        """Replaces the masked layers with smaller ones; returns the (same) model object."""
        self.report = shrink(
            self.model,
            self.masks_file,
            self.dummy_input,
            customized_replace_func=self.customized_replace_func,
            map_location=self.map_location,
            batch_dim=self.batch_dim,
        )
        return self.model
