import copy

import pytest
import torch
from torch import nn

from modelpress.distill import mft
from modelpress.algos import mask as MK
from modelpress.errors import UserError

from .conftest import tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def test_topk_mask_exact_count_and_ste_gradient():
    s = torch.randn(16, 24, requires_grad=True)
    m = MK.topk_mask(s, 0.9)
    assert int(m.sum()) == round(0.9 * 16 * 24)
    # kept entries are exactly the highest scores
    assert float(s.detach()[m].min()) >= float(s.detach()[~m].max())
    hard = MK.ste_mask(s, 0.9)
    assert torch.equal(hard, m.float())
    g = torch.randn(16, 24)
    (hard * g).sum().backward()
    assert torch.equal(s.grad, g)     # straight-through: identity gradient


def test_keep_one_reproduces_base_exactly(llama, ids):
    ref = llama(input_ids=ids).logits
    model = copy.deepcopy(llama)
    mft.apply_masks(model, [0, 1], keep=1.0)
    out = model(input_ids=ids).logits
    assert torch.equal(out, ref)


def test_exact_zero_counts_and_bake_equals_masked_forward(llama, ids):
    model = copy.deepcopy(llama)
    masked = mft.apply_masks(model, [1], keep=0.9)
    assert len(masked) == 7 and all(".layers.1." in n for n in masked)
    # perturb scores so the mask is not simply magnitude order
    torch.manual_seed(0)
    for m in masked.values():
        m.scores.data += torch.randn_like(m.scores)
    with torch.no_grad():
        masked_out = model(input_ids=ids).logits
    stats = mft.mask_stats(model)
    mft.bake(model)
    assert not mft.masked_modules(model)
    for name, st in stats.items():
        w = model.get_submodule(name).weight
        assert type(model.get_submodule(name)) is nn.Linear
        assert int((w == 0).sum()) == w.numel() - round(0.9 * w.numel()) == st["pruned"]
    with torch.no_grad():
        baked_out = model(input_ids=ids).logits
    torch.testing.assert_close(baked_out, masked_out, atol=1e-6, rtol=0)
    # layers outside the range are untouched
    for n, p in llama.named_parameters():
        if ".layers.0." in n:
            assert torch.equal(p, model.get_parameter(n))


def test_gradients_reach_only_scores(llama, ids):
    model = copy.deepcopy(llama)
    mft.apply_masks(model, [0], keep=0.8)
    loss = mft.lm_loss(model, ids)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(".scores") for n in with_grad)
    assert all(float(model.get_parameter(n).grad.abs().sum()) > 0 for n in with_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad


def test_training_lowers_loss_and_keeps_weights(llama):
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 128, (8, 16), generator=g)
    model = copy.deepcopy(llama)
    mft.apply_masks(model, [0, 1], keep=0.9)
    w_before = {n: m.weight.clone() for n, m in mft.masked_modules(model).items()}
    losses = mft.train_masks(model, windows, steps=30, lr=0.05, batch_size=8)
    assert losses[-1] < losses[0] - 0.01
    for n, m in mft.masked_modules(model).items():
        assert torch.equal(m.weight, w_before[n])
    assert max(st["changed_vs_magnitude"] for st in mft.mask_stats(model).values()) > 0


def test_parse_layers():
    assert mft.parse_layers("4-7", 30) == [4, 5, 6, 7]
    assert mft.parse_layers("1,3-4", 8) == [1, 3, 4]
    assert mft.parse_layers("all", 3) == [0, 1, 2]
    for bad in ("7-4", "2-40", "x"):
        with pytest.raises(UserError):
            mft.parse_layers(bad, 30)


def test_random_init_is_the_official_one(llama):
    """Scores ~ N(0, initializer_range), the mask is the top-k of |scores|, and the seed fixes them."""
    a, b, c = (copy.deepcopy(llama) for _ in range(3))
    ma = mft.apply_masks(a, [0], keep=0.9, seed=1)
    mb = mft.apply_masks(b, [0], keep=0.9, seed=1)
    mc = mft.apply_masks(c, [0], keep=0.9, seed=2)
    s = torch.cat([m.scores.detach().reshape(-1) for m in ma.values()])
    assert abs(float(s.std()) - llama.config.initializer_range) < 0.1 * llama.config.initializer_range
    assert abs(float(s.mean())) < 0.1 * llama.config.initializer_range
    for n, m in ma.items():
        assert torch.equal(m.scores, mb[n].scores) and not torch.equal(m.scores, mc[n].scores)
        mk = m.mask()
        assert torch.equal(mk, MK.topk_mask(m.scores.detach().abs(), 0.9))
        assert float(m.scores.detach().abs()[mk].min()) >= float(m.scores.detach().abs()[~mk].max())
    mag = mft.apply_masks(copy.deepcopy(llama), [0], keep=0.9, init="magnitude")
    for n, m in mag.items():
        assert torch.equal(m.mask(), MK.topk_mask(m.weight.abs(), 0.9))
    with pytest.raises(UserError, match="init"):
        mft.apply_masks(copy.deepcopy(llama), [0], init="zeros")


class _Tok:
    """Characters as tokens (ord), EOS 1, pad 0: enough to check the SFT layout."""
    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def test_sft_tensors_mask_the_prompt_and_pad():
    ids, labels = mft.sft_tensors(_Tok(), [("ab", "X"), ("abcd", "YZ")], max_len=16)
    assert ids.tolist() == [[97, 98, 88, 1, 0, 0, 0], [97, 98, 99, 100, 89, 90, 1]]
    assert labels.tolist() == [[-100, -100, 88, 1, -100, -100, -100], [-100] * 4 + [89, 90, 1]]
    ids, labels = mft.sft_tensors(_Tok(), [("abcdef", "X")], max_len=4)      # prompt cut from the left
    assert ids.tolist() == [[101, 102, 88, 1]] and labels.tolist() == [[-100, -100, 88, 1]]
    with pytest.raises(UserError, match="max_len"):
        mft.sft_tensors(_Tok(), [("a", "XYZ")], max_len=3)


def test_response_masked_loss_ignores_prompt_and_padding(llama):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (2, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 6:8] = ids[:, 6:8]
    logits = llama(input_ids=ids).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits[:, 5:7].reshape(-1, logits.shape[-1]), ids[:, 6:8].reshape(-1))
    torch.testing.assert_close(mft.lm_loss(llama, ids, labels), want, rtol=1e-5, atol=1e-6)
    # trailing columns without labels are dropped and do not change the loss
    x, y = mft._trim(ids, labels)
    assert x.shape[1] == 8 and torch.equal(y, labels[:, :8])
    torch.testing.assert_close(mft.lm_loss(llama, x, y), want, rtol=1e-5, atol=1e-6)


def test_fit_draws_every_row_once_per_epoch(llama, monkeypatch):
    """One loss per step; batches come from a fresh permutation of the rows each epoch."""
    model = copy.deepcopy(llama)
    mft.apply_masks(model, [0], keep=0.9)
    scores = [m.scores for m in mft.masked_modules(model).values()]
    ids = torch.randint(2, 128, (6, 8), generator=torch.Generator().manual_seed(1))
    seen = []
    orig = mft.lm_loss
    monkeypatch.setattr(mft, "lm_loss", lambda m, x, y=None: (seen.append(x.clone()), orig(m, x, y))[1])
    losses = mft.fit(model, scores, ids, steps=6, lr=1e-3, batch_size=2, warmup_ratio=0.34)
    assert len(losses) == 6
    rows = [tuple(r.tolist()) for x in seen for r in x]
    first, second = rows[:6], rows[6:]
    assert sorted(first) == sorted(second) == sorted(tuple(r.tolist()) for r in ids)
