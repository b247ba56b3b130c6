"""Benchmark: speedup on Hugging Face architectures nobody tuned it for, under two kinds of 50% masks.

A sweep for generality, not for speed, as ``timm_models`` is for timm: decoders, encoders,
encoder-decoders, vision, speech and text-and-image models of ``transformers``, each built from a tiny
config of its own family (random weights, nothing downloaded), with the head a task adds (speech to
text or CTC for speech, else causal LM where the family has one, else sequence-to-sequence, sequence
or image classification, else the bare model):

* masks ``a``: a random half of the output channels of every ``Linear`` / ``Conv2d`` but the head
  (those whose outputs are the vocabulary or the labels), with their biases;
* masks ``b``: ``speedup.groups.consistent_masks(model, dummy, sparsity=0.5)``;
* ``speedup.shrink`` on a dummy of batch 2 (16 tokens, the first sample padded; 32 x 32 pixels; 400
  audio samples), compared with the masked model on a fresh input of batch 3 (12 tokens; 40 x 40
  pixels where the family takes other sizes; 300 samples), both runs drawing the same random numbers
  (ViT-MAE shuffles its patches).

Usage::

    bash dev.sh bench hf_architectures                     # every family below (under a minute on 2 cores)
    bash dev.sh bench hf_architectures --models olmo,beit --masks b

Rows go to ``benchmarks/results/hf_architectures.json`` (``--json PATH`` to put them elsewhere).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from _common import random_channel_masks  # noqa: E402
from _sweep import sweep_main, sweep_row  # noqa: E402

from speedup.groups import consistent_masks  # noqa: E402

VOCAB, HIDDEN, HEADS, LAYERS, FFN = 100, 64, 4, 2, 128
_DECODER = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN)
_GQA = dict(_DECODER, num_key_value_heads=2)
_SEQ2SEQ = dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN)
_T5 = dict(d_model=HIDDEN, num_layers=LAYERS, num_heads=HEADS, d_ff=FFN, d_kv=16)
_VIT = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64, image_size=32,
            patch_size=8)
_STAGES = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])

TEXT = {
    "gpt_neo": dict(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, attention_types=[[["global", "local"], 1]],
                    window_size=8, intermediate_size=FFN),
    "gptj": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_inner=FFN),
    "codegen": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_inner=FFN),
    "llama": dict(_GQA, tie_word_embeddings=True), "mistral": _GQA, "qwen2": _GQA, "qwen3": dict(_GQA, head_dim=16),
    "opt": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                word_embed_proj_dim=HIDDEN),
    "gpt_neox": _DECODER, "phi": _DECODER, "olmo": _DECODER, "olmo2": _DECODER, "biogpt": _DECODER,
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    "falcon": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, new_decoder_architecture=True,
                   num_kv_heads=2),
    "mpt": dict(d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS),
    "xglm": dict(d_model=HIDDEN, num_layers=LAYERS, attention_heads=HEADS, ffn_dim=FFN),
    "phi3": _GQA, "stablelm": _GQA, "starcoder2": _GQA, "cohere": _GQA, "granite": _GQA,
    "gemma2": dict(_GQA, head_dim=16), "gemma3_text": dict(_GQA, head_dim=16),
    "qwen2_moe": dict(_GQA, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2),
    "albert": dict(_DECODER, embedding_size=32), "electra": dict(_DECODER, embedding_size=32),
    "convbert": dict(_DECODER, embedding_size=32), "roformer": dict(_DECODER, embedding_size=HIDDEN),
    "squeezebert": dict(_DECODER, embedding_size=HIDDEN),
    "mobilebert": dict(_DECODER, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32),
    "deberta": _DECODER, "deberta-v2": _DECODER, "xlm-roberta": _DECODER, "mpnet": _DECODER, "ernie": _DECODER,
    "camembert": _DECODER, "megatron-bert": _DECODER, "modernbert": _DECODER,
    "funnel": dict(d_model=HIDDEN, n_head=HEADS, d_head=16, d_inner=FFN, block_sizes=[1, 1], num_decoder_layers=1),
    "bart": dict(_SEQ2SEQ, decoder_start_token_id=2), "mbart": dict(_SEQ2SEQ, decoder_start_token_id=2),
    "pegasus": dict(_SEQ2SEQ, decoder_start_token_id=0),
    "mt5": dict(_T5, decoder_start_token_id=0), "longt5": dict(_T5, decoder_start_token_id=0),
    "xlnet": dict(d_model=HIDDEN, n_layer=LAYERS, n_head=HEADS, d_inner=FFN),
    "mamba2": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_heads=8, head_dim=16, expand=2, n_groups=2,
                   state_size=16, chunk_size=8),
}
VISION = {
    "vit": _VIT, "deit": _VIT, "dinov2": dict(_VIT, mlp_ratio=2), "vit_msn": _VIT, "clip_vision_model": _VIT,
    "siglip_vision_model": _VIT, "beit": dict(_VIT, use_relative_position_bias=True),
    "yolos": dict(_VIT, image_size=[32, 32], num_detection_tokens=4),
    "swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4),
    "swinv2": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4, window_size=4),
    "convnext": _STAGES, "convnextv2": _STAGES, "poolformer": _STAGES,
    "resnet": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"),
    "regnet": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
    "bit": dict(embedding_size=32, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1], num_groups=8),
    "segformer": dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                      num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                      decoder_hidden_size=32),
    "mobilevit": dict(image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                      num_attention_heads=2),
    "mobilenet_v1": dict(image_size=32, depth_multiplier=0.25), "mobilenet_v2": dict(image_size=32, depth_multiplier=0.35),
    "efficientnet": dict(image_size=32, width_coefficient=0.5, depth_coefficient=0.25, hidden_dim=640),
    "levit": dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
                  key_dim=[8, 8, 8]),
    "pvt": dict(image_size=32, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4]),
    "pvt_v2": dict(_STAGES, num_attention_heads=[1, 2, 2, 4]),
    "focalnet": dict(embed_dim=16, depths=[1, 1], image_size=32, patch_size=4),
    "swiftformer": dict(depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], image_size=32),
    "vit_mae": dict(_VIT, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                    decoder_intermediate_size=64),
    "vitdet": dict(_VIT, mlp_ratio=2, pretrain_image_size=32, window_size=2, window_block_indices=[0],
                   use_relative_position_embeddings=True, out_features=["stage2"]),
}
_SPEECH = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
               conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
               num_conv_pos_embedding_groups=4)
AUDIO = {
    "wav2vec2": dict(_SPEECH, do_stable_layer_norm=True), "hubert": _SPEECH,
    "whisper": dict(_SEQ2SEQ, vocab_size=VOCAB, num_mel_bins=16, max_source_positions=32, max_target_positions=64,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
}
TEXT_AND_IMAGE = {
    "clip": dict(text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=64, max_position_embeddings=32),
                 vision_config=_VIT, projection_dim=16),
}
FAMILIES = {**TEXT, **VISION, **AUDIO, **TEXT_AND_IMAGE}
_HEADS = (transformers.AutoModelForSpeechSeq2Seq, transformers.AutoModelForCTC, transformers.AutoModelForCausalLM,
          transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForSequenceClassification,
          transformers.AutoModelForImageClassification, transformers.AutoModel)


def build(name: str) -> tuple[nn.Module, transformers.PretrainedConfig]:
    """The family's model with the first head of :data:`_HEADS` it has, from its tiny config."""
    tokens = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2) if name in TEXT else {}
    config = transformers.AutoConfig.for_model(name, **tokens, **FAMILIES[name])
    for auto in _HEADS:
        model_class = auto._model_mapping.get(type(config), None)
        if model_class is not None:
            model_class = model_class[0] if isinstance(model_class, tuple) else model_class
            torch.manual_seed(0)
            return model_class(config).eval(), config
    raise ValueError(f"no model class for {name}")


def inputs(name: str, config, batch: int, length: int, side: int, seed: int) -> object:
    """Tokens (the first sample padded), pixels, a waveform, or mel features, as the family reads."""
    generator = torch.Generator().manual_seed(seed)
    if name in VISION:
        return _pixels(config, batch, side, generator)
    if name == "whisper":  # its encoder takes exactly twice max_source_positions frames
        return {"input_features": torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions,
                                              generator=generator),
                "decoder_input_ids": torch.randint(3, VOCAB, (batch, length - 2), generator=generator)}
    if name in AUDIO:
        return {"input_values": torch.randn(batch, 25 * length, generator=generator)}
    if name in TEXT_AND_IMAGE:
        return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator),
                "pixel_values": _pixels(config.vision_config, batch, side, generator)}
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    given = {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator), "attention_mask": mask}
    if config.is_encoder_decoder:
        given["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length - 2), generator=generator)
    return given


def _pixels(config, batch: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """Images of ``side`` pixels, or of the size the family fixes in its config."""
    fixed = getattr(config, "image_size", None)
    side = side if fixed is None else (fixed[0] if isinstance(fixed, (list, tuple)) else max(fixed, 32))
    return torch.randn(batch, 3, side, side, generator=generator)


def heads(model: nn.Module, config) -> list[nn.Module]:
    """The layers whose outputs are the vocabulary's logits or the labels' (left unmasked)."""
    widths = {VOCAB, getattr(config, "num_labels", None)}
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] in widths]


def bench(name: str, kind: str) -> dict:
    def prepare():
        model, config = build(name)
        dummy, fresh = inputs(name, config, 2, 16, 32, seed=1), inputs(name, config, 3, 12, 40, seed=2)
        masks = random_channel_masks(model, heads(model, config)) if kind == "a" else consistent_masks(
            model, dummy, sparsity=0.5, seed=0)
        return model, masks, dummy, fresh

    return sweep_row(name, kind, prepare)


def main(argv: Optional[list[str]] = None) -> int:
    return sweep_main(argv, __doc__.split("\n\n")[0], list(FAMILIES), bench, "hf_architectures",
                      "speedup on Hugging Face architectures (tiny configs, random weights; a/b = after / before)",
                      {"transformers": transformers.__version__})


if __name__ == "__main__":
    sys.exit(main())
