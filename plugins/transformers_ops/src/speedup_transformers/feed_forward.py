"""Feed-forward blocks of each family: their intermediate width, read off the up projection.

No family's ``forward`` reads a stored intermediate width, but the config states it for every layer
(``intermediate_size``, GPT-2's ``n_inner``, T5's ``d_ff``, OPT's ``ffn_dim``, DistilBERT's
``hidden_dim``) and Llama's MLP repeats it in attributes; they are kept true where the layers agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Callable

from torch import nn

from .layer_kinds import LayerKind, laid_out_as, output_width


@dataclass(frozen=True)
class FeedForwardSizes:
    intermediate: int
    hidden: int
    """Width of the residual stream the block writes into."""


def _projections(up: str, down: str) -> Callable[[nn.Module], FeedForwardSizes]:
    """Measures a block whose up and down projections are at these attribute paths."""
    parts = attrgetter(up, down)

    def measure(block: nn.Module) -> FeedForwardSizes:
        up_projection, down_projection = parts(block)
        return FeedForwardSizes(output_width(up_projection), output_width(down_projection))

    return measure


def _intermediate(field: str) -> dict[str, str]:
    return {field: "intermediate"}


FEED_FORWARD = (
    LayerKind(
        ("transformers.models.llama.modeling_llama.LlamaMLP",
         "transformers.models.mistral.modeling_mistral.MistralMLP",
         "transformers.models.qwen2.modeling_qwen2.Qwen2MLP"),
        _projections("up_proj", "down_proj"),
        lambda s: {"intermediate_size": s.intermediate, "hidden_size": s.hidden},
        _intermediate("intermediate_size"),
        laid_out_as(("gate_proj", "up_proj", "down_proj"), ("intermediate_size", "hidden_size")),
    ),
    LayerKind(("transformers.models.gpt2.modeling_gpt2.GPT2MLP",), _projections("c_fc", "c_proj"),
              config=_intermediate("n_inner")),
    LayerKind(("transformers.models.t5.modeling_t5.T5DenseActDense",), _projections("wi", "wo"),
              config=_intermediate("d_ff")),
    LayerKind(("transformers.models.t5.modeling_t5.T5DenseGatedActDense",), _projections("wi_0", "wo"),
              config=_intermediate("d_ff")),
    LayerKind(("transformers.models.opt.modeling_opt.OPTDecoderLayer",), _projections("fc1", "fc2"),
              lambda s: {"embed_dim": s.hidden}, _intermediate("ffn_dim")),
    LayerKind(("transformers.models.distilbert.modeling_distilbert.FFN",), _projections("lin1", "lin2"),
              config=_intermediate("hidden_dim")),
    LayerKind(("transformers.models.vit.modeling_vit.ViTMLP",), _projections("fc1", "fc2"),
              config=_intermediate("intermediate_size")),
    LayerKind(("transformers.models.bert.modeling_bert.BertLayer",
               "transformers.models.roberta.modeling_roberta.RobertaLayer"),
              _projections("intermediate.dense", "output.dense"), config=_intermediate("intermediate_size")),
)
