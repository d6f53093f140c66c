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


TEXT = ("The quick brown fox jumps over the lazy dog. Compression keeps what matters and drops the rest.\n\n"
        "A second paragraph about foxes, dogs and what matters in a compressed model.\n\n") * 60
STAGES = {
    "gptq": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
    "rtn-with-lm_head": [{"quantize": {"method": "rtn", "bits": 3, "group_size": 32, "exclude": []}}],
    "magnitude-then-gptq": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                            {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
}


@pytest.mark.parametrize("case", list(STAGES))
def test_streamed_run_equals_in_memory_run(case, tmp_path, one_thread):
    """run_recipe goes layer by layer from the shards by default where it can; its figures, sizes and exported
    tensors are those of the in-memory run, exactly."""
    import modelpress as mp
    from safetensors.torch import load_file as read_safetensors
    from .conftest import tiny_model_dir
    model_dir = tiny_model_dir(tmp_path / "model")
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT.upper())
    recipe = mp.Recipe.from_dict({
        "calibration": {"source": str(tmp_path / "a.txt"), "samples": 4, "seqlen": 32},
        "evaluate": {"text": str(tmp_path / "a.txt"), "off_domain": str(tmp_path / "b.txt"), "seqlen": 32,
                     "windows": 5},
        "stages": STAGES[case]})
    mem = mp.run_recipe(recipe, str(model_dir), tmp_path / "mem", streaming=False)
    st = mp.run_recipe(recipe, str(model_dir), tmp_path / "st")
    assert st.get("streamed") and not mem.get("streamed")
    for part in ("eval", "size"):
        a, b = dict(mem[part]), dict(st[part])
        if part == "eval":
            a["compressed"], b["compressed"] = dict(a["compressed"]), dict(b["compressed"])
        if part == "size":                     # the safetensors headers differ (tensor order, padding) by bytes
            assert abs(a.pop("file_bytes") - b.pop("file_bytes")) < 1024
        assert a == b, part
    assert mem["eval"]["off_domain"]["compressed"]["kl"] > 0
    ta, tb = read_safetensors(tmp_path / "mem" / "model.safetensors"), read_safetensors(tmp_path / "st" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert not (tmp_path / "st.partial").exists()
    mp.load(tmp_path / "st")                               # checksums and manifest verified


def test_streaming_refused_with_the_reason(tmp_path):
    import modelpress as mp
    from modelpress.errors import UserError
    from .conftest import tiny_model_dir
    model_dir = tiny_model_dir(tmp_path / "model")
    recipe = mp.Recipe.from_dict({"stages": [{"lowrank": {}}]})
    with pytest.raises(UserError, match="layer by layer.*lowrank"):
        mp.run_recipe(recipe, str(model_dir), tmp_path / "o", evaluate_models=False, streaming=True)
