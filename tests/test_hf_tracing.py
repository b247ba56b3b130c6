"""Tracing by running the model: Hugging Face models that torch.fx and torch.jit cannot trace.

GPT-2 and Llama return a ``DynamicCache`` in their output; BERT assigns into proxies. Recording a
real forward pass handles all three. These use core's rules only (plus GPT-2's Conv1D from the
transformers plugin): the FFN's intermediate channels go, and logits *and* the KV cache equal the
masked model's.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from support.checks import check_speedup, keep_mask, rows  # noqa: E402


def small_llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=100)
    return transformers.LlamaForCausalLM(config).eval()


def test_llama_returning_its_kv_cache_loses_masked_ffn_channels():
    model = small_llama()
    masks = {}
    for i in range(2):
        keep = keep_mask(128)
        masks[f"model.layers.{i}.mlp.gate_proj"] = {"weight": rows(keep, (128, 64))}
        masks[f"model.layers.{i}.mlp.up_proj"] = {"weight": rows(keep, (128, 64))}
    dummy = {"input_ids": torch.randint(0, 100, (2, 7)), "use_cache": True}
    fresh = {"input_ids": torch.randint(0, 100, (3, 9)), "use_cache": True}
    check_speedup(model, masks, dummy, fresh, shrunk=["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"])
    assert model.model.layers[0].mlp.gate_proj.out_features == 64


def test_gpt2_returning_its_kv_cache_loses_masked_ffn_channels():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    masks = {}
    for i in range(2):
        keep = keep_mask(256)
        masks[f"transformer.h.{i}.mlp.c_fc"] = {"weight": keep[None, :].expand(64, 256), "bias": keep}
    dummy = {"input_ids": torch.randint(0, 100, (2, 7)), "use_cache": True}
    fresh = {"input_ids": torch.randint(0, 100, (1, 11)), "use_cache": True}
    check_speedup(model, masks, dummy, fresh, shrunk=["transformer.h.0.mlp.c_proj.weight"])


def test_bert_keeps_working_for_other_sequence_lengths():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=100)
    model = transformers.BertModel(config).eval()
    masks = {}
    for i in range(2):
        keep = keep_mask(128)
        masks[f"encoder.layer.{i}.intermediate.dense"] = {"weight": rows(keep, (128, 64)), "bias": keep}
    dummy = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, -4:] = 0
    fresh = {"input_ids": torch.randint(0, 100, (3, 12)), "attention_mask": mask}
    check_speedup(model, masks, dummy, fresh, shrunk=["encoder.layer.0.output.dense.weight"])


def test_symbolic_tracing_cannot_follow_these_models():
    # The reason the engine records a real run: torch.fx fails where it succeeds.
    fx = pytest.importorskip("torch.fx")
    with pytest.raises(Exception):
        fx.symbolic_trace(small_llama())
