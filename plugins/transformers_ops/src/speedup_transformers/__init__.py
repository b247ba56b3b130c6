"""speedup rules for Hugging Face transformers models, registered through the ``speedup`` entry points.

What transformers models need beyond core's rules: GPT-2's ``Conv1D``; the RMS norms the models define
in Python (so hidden channels can go); the sizes that attention and feed-forward layers keep in
attributes and that the config states (so the model keeps working with masks, padding, caches and
``generate``); and the key/value cache, which follows the heads that remain. A shrunk model has
layers of different sizes, which a config cannot describe: :func:`save_pretrained` and
:func:`from_pretrained` save and restore it.

Types are registered by qualified name, so loading the plugin does not import transformers (which
takes about a second); a rule applies when a model contains such a module.
"""

from __future__ import annotations

from speedup import hookimpl
from speedup.plugins.pruning_registry import ChannelLayout, PruningRegistry
from speedup.plugins.registry import RuleRegistry

from . import rms_norm
from .config_sizes import KINDS, agreed_config_fields, recognised_size_attributes
from .conv1d import Conv1DRule
from .persistence import from_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = ["save_pretrained", "from_pretrained"]


@hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    registry.add_module("transformers.pytorch_utils.Conv1D", Conv1DRule())
    rms_norm.register(registry)
    for kind in KINDS.kinds:
        if kind.attributes is not None:
            for name in kind.classes:
                registry.add_sizes(name, kind.size_attributes)
    # Layers of families not listed, laid out as a listed kind (every copy of Llama's attention):
    # the nearest registered base of such a class is torch's Module itself.
    registry.add_sizes("torch.nn.modules.module.Module", recognised_size_attributes)
    registry.add_sizes("transformers.modeling_utils.PreTrainedModel", agreed_config_fields)
    # A key/value cache is returned only to be passed back in: it holds the heads that remain.
    registry.add_state("transformers.cache_utils.Cache")


@hookimpl
def speedup_register_pruning(registry: PruningRegistry) -> None:
    # Conv1D keeps its weight as (in, out): output channels are its columns.
    registry.add_channels("transformers.pytorch_utils.Conv1D", ChannelLayout(weight_out=1, weight_in=0, output=-1))
    for name in rms_norm.RMS_NORMS:
        registry.add_channels(name, ChannelLayout(weight_out=0, weight_in=None, output=-1, parameters=()))
