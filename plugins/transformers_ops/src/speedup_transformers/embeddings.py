"""Embedding widths that a config states apart from the hidden size.

OPT embeds tokens at ``word_embed_proj_dim`` and projects them to ``hidden_size`` only where the two
differ; once hidden channels (and with them the embedding's columns) have gone, both fields must
follow, or the config would describe a model with projections this one does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layer_kinds import LayerKind


@dataclass(frozen=True)
class EmbeddingSizes:
    width: int


EMBEDDINGS = (
    LayerKind(("transformers.models.opt.modeling_opt.OPTDecoder",),
              lambda decoder: EmbeddingSizes(decoder.embed_tokens.embedding_dim),
              config={"word_embed_proj_dim": "width"}),
)
