"""Tiny in-process models (no download) shared by the tests."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from modelpress.calib import CalibrationSet

VOCAB = 128


def tiny_llama(seed: int = 0, tie: bool = True, layers: int = 2, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    from modelpress.model import normalize
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return normalize(GPT2LMHeadModel(cfg).eval())


def correlated_calib(n: int = 16, seqlen: int = 32, seed: int = 1) -> CalibrationSet:
    """Token windows with structure (repeated motifs) so activations are correlated."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (8,), generator=g)
    ids = torch.randint(0, VOCAB, (n, seqlen), generator=g)
    ids[:, ::2] = motif.repeat(seqlen // 16 + 1)[: (seqlen + 1) // 2]
    return CalibrationSet.from_ids(ids, source="synthetic", seed=seed)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def calib():
    return correlated_calib()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a few sentences (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog"] * 20 + ["compression keeps what matters"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_model_dir(path, layers: int = 2, hidden: int = 64, inter: int = 128):
    """A tiny Llama + tokenizer saved as an ordinary HF folder."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=max(VOCAB, len(tok)), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models on the shared 2-core CI box: one intra-op thread is faster than two contended ones.
    Restores the caller's thread count (thread-count changes must not leak between tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
