"""Attention layers of each family: their heads, read off the projections once heads have gone.

Core removes whole heads through ``scaled_dot_product_attention`` (and grouped-query attention);
``head_dim`` never changes. What the Python code of each family adds is the number of heads it
keeps in attributes: OPT reshapes with ``self.num_heads``, GPT-2 splits its fused projection with
``self.split_size``, T5 builds its position bias with ``self.n_heads``, Llama repeats its key/value
heads ``self.num_key_value_groups`` times. Those follow the projections here, and the config fields
stating the same sizes are gathered by :mod:`speedup_transformers.config_sizes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Callable

from torch import nn

from .layer_kinds import LayerKind, laid_out_as, output_width


@dataclass(frozen=True)
class AttentionSizes:
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (as many as query heads without grouped-query attention)."""
    head_dim: int
    hidden: int
    """Width of the residual stream the layer writes into."""

    @property
    def width(self) -> int:
        """Features of all query heads together."""
        return self.heads * self.head_dim

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads if self.kv_heads else 1


def _projections(query: str, key: str, out: str, head_dim: str) -> Callable[[nn.Module], AttentionSizes]:
    """Measures a layer whose projections and head size are at these (dotted) attribute paths."""
    parts = attrgetter(query, key, out, head_dim)

    def measure(layer: nn.Module) -> AttentionSizes:
        q, k, o, size = parts(layer)
        return AttentionSizes(output_width(q) // size, output_width(k) // size, size, output_width(o))

    return measure


def _gpt2(layer: nn.Module) -> AttentionSizes:
    # Self-attention fuses q|k|v in c_attn; cross-attention has q_attn and fuses k|v.
    query = output_width(layer.q_attn) if layer.is_cross_attention else output_width(layer.c_attn) // 3
    heads = query // layer.head_dim
    return AttentionSizes(heads, heads, layer.head_dim, output_width(layer.c_proj))


HEADS_AND_HIDDEN = {"num_attention_heads": "heads", "hidden_size": "hidden"}

ATTENTION = (
    LayerKind(
        ("transformers.models.llama.modeling_llama.LlamaAttention",
         "transformers.models.mistral.modeling_mistral.MistralAttention",
         "transformers.models.qwen2.modeling_qwen2.Qwen2Attention"),
        _projections("q_proj", "k_proj", "o_proj", "head_dim"),
        lambda s: {"num_key_value_groups": s.groups},
        {**HEADS_AND_HIDDEN, "num_key_value_heads": "kv_heads", "head_dim": "head_dim"},
        # Qwen3, Gemma, Mixtral, Granite, OLMo... copy Llama's attention under their own names.
        laid_out_as(("q_proj", "k_proj", "v_proj", "o_proj"), ("head_dim", "num_key_value_groups")),
    ),
    LayerKind(
        ("transformers.models.gpt2.modeling_gpt2.GPT2Attention",),
        _gpt2,
        lambda s: {"num_heads": s.heads, "split_size": s.width, "embed_dim": s.hidden},
        HEADS_AND_HIDDEN,
    ),
    LayerKind(
        ("transformers.models.t5.modeling_t5.T5Attention",),
        _projections("q", "k", "o", "key_value_proj_dim"),
        lambda s: {"n_heads": s.heads, "inner_dim": s.width, "d_model": s.hidden},
        HEADS_AND_HIDDEN,
    ),
    LayerKind(
        ("transformers.models.opt.modeling_opt.OPTAttention",),
        _projections("q_proj", "k_proj", "out_proj", "head_dim"),
        lambda s: {"num_heads": s.heads, "embed_dim": s.hidden},
        HEADS_AND_HIDDEN,
    ),
    LayerKind(
        # BART's attention as XGLM, M2M100, Whisper... copy it: no class listed, recognised by its layout.
        # Where its forward reads embed_dim, it is the width of the heads together (XGLM reshapes with it).
        (),
        _projections("q_proj", "k_proj", "out_proj", "head_dim"),
        lambda s: {"num_heads": s.heads, "embed_dim": s.width},
        HEADS_AND_HIDDEN,
        laid_out_as(("q_proj", "k_proj", "v_proj", "out_proj"), ("num_heads", "head_dim", "embed_dim")),
    ),
    LayerKind(
        ("transformers.models.distilbert.modeling_distilbert.DistilBertSelfAttention",),
        _projections("q_lin", "k_lin", "out_lin", "attention_head_size"),
        lambda s: {"n_heads": s.heads, "dim": s.width},
        HEADS_AND_HIDDEN,
    ),
    LayerKind(
        ("transformers.models.vit.modeling_vit.ViTAttention",),
        _projections("q_proj", "k_proj", "o_proj", "head_dim"),
        lambda s: {"num_attention_heads": s.heads},
        {**HEADS_AND_HIDDEN, "head_dim": "head_dim"},
    ),
    LayerKind(
        ("transformers.models.bert.modeling_bert.BertAttention",
         "transformers.models.roberta.modeling_roberta.RobertaAttention"),
        # BertAttention: the heads are in `self` (BertSelfAttention), the output projection in `output`.
        _projections("self.query", "self.key", "output.dense", "self.attention_head_size"),
        lambda s: {"self.num_attention_heads": s.heads, "self.all_head_size": s.width},
        HEADS_AND_HIDDEN,
    ),
)
