"""The transformers plugin on every supported family: heads, FFN channels and hidden channels go.

Each family is a model built from a tiny config (random weights, nothing downloaded) with a head on
top, so that the hidden stream is internal and can shrink too. Three kinds of masks per family:

* heads: whole heads masked on the query/key/value projections (different heads per layer, the same
  number); for grouped-query attention one layer loses a whole key/value group, the other the same
  query head of every group (its output projection columns masked too, since its keys and values
  stay). T5 shares its position bias across the layers of a stack, so all of them lose the same heads;
* FFN: intermediate channels masked on the up (and gate) projections;
* hidden: channels of the residual stream, everywhere they are read or written, picked from the
  dependency group of the input embedding (``speedup.groups``).

Every speedup is compared with the masked model on a fresh input (another batch size and length,
with padding), must shrink what was masked, and must leave nothing at full size for verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import speedup  # noqa: E402
import speedup.groups  # noqa: E402
import speedup_transformers  # noqa: E402
from speedup.testing import assert_same_outputs, masked_copy  # noqa: E402
from support.checks import check_speedup, keep_mask  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 100, 64, 4, 2, 16, 128, 2


@dataclass(frozen=True)
class Attention:
    """Where one attention layer's projections are; ``fused`` when q, k and v share one Conv1D (GPT-2)."""

    prefix: str
    q: str
    k: str
    v: str
    o: str
    kv_heads: int = HEADS
    fused: bool = False
    shared: bool = False
    """All layers of its stack must lose the same heads (T5's position bias is computed once)."""


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    attention: list[Attention]
    ffn: list[list[str]]
    """Per layer, the projections whose output channels are the intermediate ones."""
    embedding: str
    """The parameter whose dimension ``embedding_dim`` is the hidden stream."""
    embedding_dim: int = 1
    pixels: bool = False
    decoder: bool = False
    causal: bool = False
    hidden_sized: list[str] = field(default_factory=list)
    """Config fields holding the hidden size."""


def config_kwargs(**extra) -> dict:
    return dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def llama_like(config_class, model_class, **extra) -> Family:
    """Llama, Mistral, Qwen2/3 and Gemma share one layout: grouped-query attention and a gated MLP (their
    RMS norms differ: Qwen3's and Gemma's are not listed by the plugin, but recognised)."""
    return Family(
        lambda: model_class(config_class(**config_kwargs(
            num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            intermediate_size=FFN, **extra))),
        standard_attention("model.layers.{}.self_attn", kv_heads=KV_HEADS),
        [[f"{p}.gate_proj", f"{p}.up_proj"] for p in layers("model.layers.{}.mlp")],
        "model.embed_tokens.weight",
        causal=True,
    )


def layers(template: str, count: int = LAYERS) -> list[str]:
    return [template.format(i) for i in range(count)]


def standard_attention(prefix_template: str, q="q_proj", k="k_proj", v="v_proj", o="o_proj", **options) -> list[Attention]:
    return [Attention(prefix, q, k, v, o, **options) for prefix in layers(prefix_template)]


FAMILIES: dict[str, Family] = {
    "bert": Family(
        lambda: transformers.BertForMaskedLM(transformers.BertConfig(**config_kwargs(
            num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN))),
        standard_attention("bert.encoder.layer.{}.attention", "self.query", "self.key", "self.value", "output.dense"),
        [[name] for name in layers("bert.encoder.layer.{}.intermediate.dense")],
        "bert.embeddings.word_embeddings.weight",
    ),
    "roberta": Family(
        lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**config_kwargs(
            num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
            max_position_embeddings=40))),
        standard_attention("roberta.encoder.layer.{}.attention", "self.query", "self.key", "self.value",
                           "output.dense"),
        [[name] for name in layers("roberta.encoder.layer.{}.intermediate.dense")],
        "roberta.embeddings.word_embeddings.weight",
    ),
    "distilbert": Family(
        lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(**config_kwargs(
            n_layers=LAYERS, dim=HIDDEN, n_heads=HEADS, hidden_dim=FFN))),
        standard_attention("distilbert.transformer.layer.{}.attention", "q_lin", "k_lin", "v_lin", "out_lin"),
        [[name] for name in layers("distilbert.transformer.layer.{}.ffn.lin1")],
        "distilbert.embeddings.word_embeddings.weight",
    ),
    "gpt2": Family(
        lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_kwargs(
            n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN))),
        standard_attention("transformer.h.{}.attn", "c_attn", "c_attn", "c_attn", "c_proj", fused=True),
        [[name] for name in layers("transformer.h.{}.mlp.c_fc")],
        "transformer.wte.weight",
        causal=True,
    ),
    "vit": Family(
        lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
            num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
            image_size=32, patch_size=8, num_labels=10)),
        standard_attention("vit.layers.{}.attention"),
        [[name] for name in layers("vit.layers.{}.mlp.fc1")],
        "vit.embeddings.patch_embeddings.projection.weight",
        embedding_dim=0,
        pixels=True,
    ),
    "t5-encoder": Family(
        lambda: transformers.T5ForTokenClassification(transformers.T5Config(**config_kwargs(
            num_layers=LAYERS, d_model=HIDDEN, num_heads=HEADS, d_kv=HEAD_DIM, d_ff=FFN, num_labels=5))),
        standard_attention("transformer.encoder.block.{}.layer.0.SelfAttention", "q", "k", "v", "o", shared=True),
        [[name] for name in layers("transformer.encoder.block.{}.layer.1.DenseReluDense.wi")],
        "transformer.shared.weight",
    ),
    "t5": Family(
        lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**config_kwargs(
            num_layers=LAYERS, num_decoder_layers=LAYERS, d_model=HIDDEN, num_heads=HEADS, d_kv=HEAD_DIM, d_ff=FFN,
            decoder_start_token_id=0))),
        standard_attention("encoder.block.{}.layer.0.SelfAttention", "q", "k", "v", "o", shared=True)
        + standard_attention("decoder.block.{}.layer.0.SelfAttention", "q", "k", "v", "o", shared=True)
        + standard_attention("decoder.block.{}.layer.1.EncDecAttention", "q", "k", "v", "o", shared=True),
        [[name] for name in layers("encoder.block.{}.layer.1.DenseReluDense.wi")
         + layers("decoder.block.{}.layer.2.DenseReluDense.wi")],
        "shared.weight",
        decoder=True,
    ),
    "llama": llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": llama_like(transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": llama_like(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=HEAD_DIM),
    "gemma": llama_like(transformers.GemmaConfig, transformers.GemmaForCausalLM, head_dim=HEAD_DIM),
    "opt": Family(
        lambda: transformers.OPTForCausalLM(transformers.OPTConfig(**config_kwargs(
            num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_dim=FFN,
            word_embed_proj_dim=HIDDEN, max_position_embeddings=40))),
        standard_attention("model.decoder.layers.{}.self_attn", o="out_proj"),
        [[name] for name in layers("model.decoder.layers.{}.fc1")],
        "model.decoder.embed_tokens.weight",
        causal=True,
    ),
}
CAUSAL = [name for name, family in FAMILIES.items() if family.causal]
GENERATING = CAUSAL + ["t5"]


# -- inputs -------------------------------------------------------------------------------------

def inputs(family: Family, batch: int, length: int, padded: bool = False) -> dict:
    """Keyword inputs; ``padded`` pads the first sequence (on the left for causal models)."""
    if family.pixels:
        return {"pixel_values": torch.randn(batch, 3, 32, 32)}
    ids = torch.randint(3, VOCAB, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        pad = slice(0, length // 3) if family.causal else slice(length - length // 3, length)
        ids[0, pad] = 0
        attention_mask[0, pad] = 0
    result = {"input_ids": ids, "attention_mask": attention_mask}
    if family.decoder:
        result["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(1, length - 2)))
    return result


# -- masks --------------------------------------------------------------------------------------

def _add(masks: dict, module: str, parameter: str, mask: torch.Tensor) -> None:
    entry = masks.setdefault(module, {})
    entry[parameter] = entry[parameter] & mask if parameter in entry else mask


def drop_outputs(model: nn.Module, masks: dict, name: str, keep: torch.Tensor, offset: int = 0) -> None:
    """Masks output features ``offset + i`` (``keep[i]`` False) of a Linear or Conv1D, bias included."""
    module = model.get_submodule(name)
    out_dim = 1 if isinstance(module, Conv1D) else 0
    line = torch.ones(module.weight.shape[out_dim], dtype=torch.bool)
    line[offset:offset + keep.numel()] = keep
    shape = [1, 1]
    shape[out_dim] = -1
    _add(masks, name, "weight", line.reshape(shape).expand_as(module.weight))
    if module.bias is not None:
        _add(masks, name, "bias", line)


def drop_inputs(model: nn.Module, masks: dict, name: str, keep: torch.Tensor) -> None:
    """Masks input features (``keep[i]`` False) of a Linear or Conv1D."""
    module = model.get_submodule(name)
    in_dim = 0 if isinstance(module, Conv1D) else 1
    shape = [1, 1]
    shape[in_dim] = -1
    _add(masks, name, "weight", keep.reshape(shape).expand_as(module.weight))


def per_feature(heads: torch.Tensor) -> torch.Tensor:
    return heads.repeat_interleave(HEAD_DIM)


def head_masks(model: nn.Module, family: Family) -> dict:
    """Two of the four heads of every attention layer (see the module docstring for which)."""
    masks: dict = {}
    for index, site in enumerate(family.attention):
        p = site.prefix
        keep_q = torch.ones(HEADS, dtype=torch.bool)
        keep_kv = torch.ones(site.kv_heads, dtype=torch.bool)
        if site.kv_heads < HEADS:
            group = HEADS // site.kv_heads
            if index % 2 == 0:  # a whole key/value group
                keep_kv[1] = False
                keep_q[group:2 * group] = False
            else:  # the first query head of every group; its keys and values stay
                keep_q[::group] = False
                drop_inputs(model, masks, f"{p}.{site.o}", per_feature(keep_q))
        else:
            keep_q[[1, 3] if site.shared else [index % 2, index % 2 + 2]] = False
            keep_kv = keep_q
        if site.fused:
            for part in range(3):
                drop_outputs(model, masks, f"{p}.{site.q}", per_feature(keep_q), offset=part * HIDDEN)
        else:
            drop_outputs(model, masks, f"{p}.{site.q}", per_feature(keep_q))
            drop_outputs(model, masks, f"{p}.{site.k}", per_feature(keep_kv))
            drop_outputs(model, masks, f"{p}.{site.v}", per_feature(keep_kv))
    return masks


def ffn_masks(model: nn.Module, family: Family) -> dict:
    masks: dict = {}
    for projections in family.ffn:
        keep = keep_mask(FFN)
        for name in projections:
            drop_outputs(model, masks, name, keep)
    return masks


def hidden_masks(model: nn.Module, family: Family, dummy: dict) -> dict:
    """Half the residual stream: the dependency group holding the input embedding's hidden dimension."""
    groups = speedup.groups.find_groups(model, dummy)
    hidden = [g for g in groups if any(m.parameter == family.embedding and m.dim == family.embedding_dim
                                       for m in g.members)]
    assert hidden, f"no removable group holds {family.embedding}[{family.embedding_dim}]"
    return speedup.groups.consistent_masks(model, dummy, groups=hidden)


KINDS = {
    "heads": lambda model, family, dummy: head_masks(model, family),
    "ffn": lambda model, family, dummy: ffn_masks(model, family),
    "hidden": hidden_masks,
}


def shrunk_parameters(family: Family, kind: str) -> list[str]:
    if kind == "heads":
        return [f"{family.attention[0].prefix}.{family.attention[0].q}.weight"]
    if kind == "ffn":
        return [f"{family.ffn[-1][0]}.weight"]
    return [family.embedding]


def sped_up(name: str, kind: str) -> tuple[nn.Module, nn.Module, speedup.ShrinkReport]:
    """(masked reference, sped-up model, report) for one family and kind of masks, checked on a fresh input."""
    family = FAMILIES[name]
    model = family.build().eval()
    dummy = inputs(family, 2, 7)
    masks = KINDS[kind](model, family, dummy)
    reference = masked_copy(model, masks).eval()
    report = check_speedup(model, masks, dummy, inputs(family, 3, 10, padded=True), shrunk_parameters(family, kind))
    return reference, model, report


# -- every family, every kind -------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_speeds_up_to_the_masked_model(name, kind):
    _, _, report = sped_up(name, kind)
    assert report.kept_for_verification == []
    assert report.barriers == []


# -- generate, save and load ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", GENERATING)
def test_generate_returns_the_masked_models_tokens(name, kind):
    """Greedy decoding with the key/value cache, on a left-padded batch: the same tokens."""
    reference, model, _ = sped_up(name, kind)
    prompt = inputs(FAMILIES[name], 2, 6, padded=True)
    prompt.pop("decoder_input_ids", None)
    options = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    expected = reference.generate(**prompt, **options)
    assert torch.equal(model.generate(**prompt, **options), expected)


@pytest.mark.parametrize("name, kind", [("llama", "heads"), ("qwen2", "hidden"), ("gpt2", "hidden"), ("t5", "ffn"),
                                        ("bert", "hidden"), ("opt", "heads")])
def test_a_sped_up_model_saves_and_loads_back(name, kind, tmp_path):
    _, model, _ = sped_up(name, kind)
    speedup_transformers.save_pretrained(model, tmp_path)
    loaded = speedup_transformers.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert_same_outputs(model, loaded, inputs(FAMILIES[name], 2, 9, padded=True))


def test_a_config_shared_with_another_model_is_left_to_it():
    """Two models built from one config object: the sped-up one gets its own copy stating its sizes
    (held by all its layers, as the config was); the other model and the user's config keep theirs."""
    config = transformers.LlamaConfig(**config_kwargs(num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                                      intermediate_size=FFN))
    model, other = (transformers.LlamaForCausalLM(config).eval() for _ in range(2))
    dummy = {"input_ids": torch.randint(3, VOCAB, (2, 7))}
    check_speedup(model, speedup.groups.consistent_masks(model, dummy), dummy,
                  {"input_ids": torch.randint(3, VOCAB, (3, 10))}, shrunk=["model.embed_tokens.weight"])
    assert config.hidden_size == other.config.hidden_size == HIDDEN and other.config is config
    assert model.config.hidden_size == model.model.embed_tokens.weight.shape[1] < HIDDEN
    assert {id(m.config) for m in model.modules() if "config" in vars(m)} == {id(model.config)}


def test_loading_a_directory_without_structure_says_what_to_do(tmp_path):
    FAMILIES["gpt2"].build().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        speedup_transformers.from_pretrained(tmp_path)


# -- mixtures of experts ----------------------------------------------------------------------------

def test_a_mixture_of_experts_loses_hidden_and_expert_channels():
    """Mixtral: experts held as 3-D parameters and run by grouped matrix products, tokens sorted by
    expert, a router reshaping with its stored hidden size; everything consistent masks offer goes."""
    config = transformers.MixtralConfig(**config_kwargs(
        num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=FFN, num_local_experts=4, num_experts_per_tok=2, head_dim=HEAD_DIM))
    model = transformers.MixtralForCausalLM(config).eval()
    dummy = {"input_ids": torch.randint(3, VOCAB, (2, 7))}
    report = check_speedup(model, speedup.groups.consistent_masks(model, dummy), dummy,
                           {"input_ids": torch.randint(3, VOCAB, (3, 10))}, max_param_ratio=0.3,
                           shrunk=["model.embed_tokens.weight", "model.layers.0.mlp.experts.gate_up_proj"])
    assert not report.barriers and not report.kept_for_verification
    router = model.model.layers[1].mlp.gate
    assert router.hidden_dim == router.weight.shape[1] == model.config.hidden_size < HIDDEN


# -- sizes read in a branch -------------------------------------------------------------------------

def test_a_size_a_branch_reads_blames_the_layer_not_the_call_that_moved():
    """Hiera's layer projects its input only ``if self.hidden_size != self.hidden_size_output``: a
    stored size kept in step in one stage and not in the next skipped the projection there, the next
    call was blamed, and verification gave up with everything kept. The layer's sizes are blamed now."""
    config = transformers.HieraConfig(embed_dim=16, image_size=[32, 32], patch_size=[3, 3], patch_stride=[2, 2],
                                      patch_padding=[1, 1], depths=[1, 1], num_heads=[1, 2], query_stride=[2, 2],
                                      masked_unit_size=[4, 4], num_query_pool=1, num_labels=10)
    torch.manual_seed(0)
    model = transformers.HieraForImageClassification(config).eval()
    dummy = {"pixel_values": torch.randn(2, 3, 32, 32)}
    check_speedup(model, speedup.groups.consistent_masks(model, dummy), dummy, {"pixel_values": torch.randn(3, 3, 32, 32)},
                  max_param_ratio=0.6, shrunk=["hiera.encoder.stages.0.layers.0.mlp.fc1.weight"])
