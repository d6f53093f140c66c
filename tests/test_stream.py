"""The original model scored layer by layer from its shards (modelpress.engine.stream) gives bitwise the
figures of scoring the whole model (modelpress.eval.perplexity.reference_scores), on every tiny architecture."""
from __future__ import annotations

import pytest
import torch

from modelpress.engine.stream import reference_scores_streamed
from modelpress.eval.perplexity import evaluate, reference_scores

from .test_architectures import ARCHS, V, build


def _windows(n: int = 5, seqlen: int = 24) -> torch.Tensor:
    return torch.randint(0, min(V, 128), (n, seqlen), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_reference_scores_equal_whole_model(arch, tmp_path, one_thread):
    model = build(arch, layers=3)
    model.save_pretrained(tmp_path)
    w = _windows()
    whole = reference_scores(model, w, batch_size=2)
    streamed = reference_scores_streamed(tmp_path, w, batch_size=2)
    assert len(streamed.hidden) == len(whole.hidden) == 3                  # 5 windows in batches of 2
    for a, b in zip(streamed.hidden, whole.hidden):
        assert torch.equal(a, b)
    assert torch.equal(streamed.nll, whole.nll)
    assert streamed.head_sha256 == whole.head_sha256
    # used as the reference of an evaluation: the same figures as with the whole model's scores
    other = build(arch, layers=3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a, b = evaluate(other, w, streamed, 2), evaluate(other, w, whole, 2)
    for k in ("perplexity", "reference_perplexity", "agreement", "kl", "linf"):
        assert a[k] == b[k], k
