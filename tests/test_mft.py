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
