import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from modelpress.model import decoder_layers, layer_linears, normalize, tied_lm_head, untie

from .conftest import tiny_llama

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.mark.parametrize("build,prefix,n_lin", [
    (lambda: tiny_llama(layers=3), "model.layers", 7),
    (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)), "model.layers", 7),
    (lambda: MistralForCausalLM(MistralConfig(**SMALL)), "model.layers", 7),
    (lambda: GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=16)), "model.layers", 7),
    (lambda: normalize(GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4))), "transformer.h", 4),
    (lambda: OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                      num_attention_heads=4, word_embed_proj_dim=64)), "model.decoder.layers", 6),
])
def test_generic_discovery(build, prefix, n_lin):
    torch.manual_seed(0)
    m = build()
    name, layers = decoder_layers(m)
    assert name == prefix and len(layers) == 3
    lin = layer_linears(layers[1], f"{name}.1")
    assert len(lin) == n_lin
    assert all(k.startswith(f"{prefix}.1.") for k in lin)


def test_gpt2_conv1d_rewrite_keeps_logits():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 128, (2, 16))
    ref = m(ids).logits
    normalize(m)
    assert torch.allclose(m(ids).logits, ref, atol=1e-5)


def test_tied_embeddings_detected_and_untied():
    m = tiny_llama(tie=True)
    assert tied_lm_head(m)
    untie(m)
    assert not tied_lm_head(m)
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    assert not tied_lm_head(tiny_llama(tie=False))
