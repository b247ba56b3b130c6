"""Saving a sped-up Hugging Face model and loading it back.

A shrunk model's layers have sizes its config cannot state (layers keep different numbers of heads
or intermediate channels, a norm may be one of speedup's constant-aware replacements), so the base
class's ``from_pretrained`` would build the original sizes and refuse the weights. What is saved
besides ``model.save_pretrained`` (config, generation config, safetensors weights) is the model's
structure: the module tree pickled with its parameters on the ``meta`` device (no weight data).
Loading unpickles that structure and assigns the saved weights to it.

The structure is a pickle: load only directories you trust, as with any ``torch.load`` of a module.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

STRUCTURE_FILE = "speedup_structure.pt"

PathLike = Union[str, "os.PathLike[str]"]


def save_pretrained(model: nn.Module, directory: PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(directory, **kwargs)`` plus the structure :func:`from_pretrained` needs."""
    model.save_pretrained(directory, **kwargs)
    torch.save(_structure(model), Path(directory) / STRUCTURE_FILE)


def from_pretrained(directory: PathLike, *, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """The model :func:`save_pretrained` saved in ``directory``, in eval mode, on ``device`` (default CPU).

    :raises FileNotFoundError: ``directory`` holds no structure (it was saved by ``save_pretrained``
        of transformers alone; load it with the model class's ``from_pretrained``).
    :raises ValueError: the weights do not cover every parameter of the structure.
    """
    directory = Path(directory)
    structure_file = directory / STRUCTURE_FILE
    if not structure_file.is_file():
        raise FileNotFoundError(
            f"{structure_file} does not exist: {directory} was not saved by speedup_transformers.save_pretrained. "
            "A model whose sizes its config states loads with its class's from_pretrained.")
    model = torch.load(structure_file, weights_only=False)
    missing, unexpected = model.load_state_dict(_saved_weights(directory), strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ValueError(f"the weights in {directory} do not fit its structure: missing {still_meta[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device or "cpu").eval()


def _structure(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on ``meta``; buffers are kept (some are not saved as
    weights, like rotary frequencies)."""
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                           requires_grad=parameter.requires_grad)
    return copy.deepcopy(model, memo)


def _saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file (shards included) in ``directory``."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights
