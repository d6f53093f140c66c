"""compressed-tensors export, loaded back by plain transformers (its compressed-tensors integration)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import modelpress as mp
from modelpress.errors import UserError
from modelpress.export.compressed_tensors import save_compressed_tensors

from .conftest import correlated_calib, tiny_llama

CASES = [
    [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": True}}],
    [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": False}}],
    [{"quantize": {"method": "rtn", "bits": 8, "group_size": None, "sym": True}}],
    [{"prune": {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5}},
     {"quantize": {"method": "gptq", "bits": 4, "group_size": 64, "sym": False}}],
    [{"prune": {"method": "wanda", "sparsity": 0.5}}],
]


@pytest.mark.parametrize("stages", CASES, ids=["w4g32sym", "w4g32asym", "w8ch", "2of4-w4asym", "wanda50"])
def test_transformers_loads_our_export_with_equal_logits(stages, tmp_path, ids):
    m = tiny_llama()
    mp.compress(m, mp.Recipe.from_dict({"stages": stages}), correlated_calib())
    out = save_compressed_tensors(m, None, tmp_path / "ct")
    asym = any(not s.get("quantize", {}).get("sym", True) for s in stages)
    # transformers 5.x cannot load packed asymmetric zero points into compressed modules; its dequantize
    # path reads the same checkpoint
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)
    with torch.no_grad():
        assert (back(ids).logits - m(ids).logits).abs().max() < 1e-3


def test_non_dividing_group_size_is_refused(tmp_path):
    m = tiny_llama()
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "group_size": 48}}]}), None)
    with pytest.raises(UserError, match="group_size to divide"):
        save_compressed_tensors(m, None, tmp_path / "ct")
