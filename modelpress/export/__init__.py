"""Export and reload. The native format is a folder:
  model.safetensors   plain tensors + each compressed module's tensors under `<module name>.<key>`
  modelpress.json     manifest: format version, dtype, compressed modules {name: {kind, config}},
                      tied aliases, sha256 of every tensor
  config.json, tokenizer files, recipe.yaml, report.json, calibration.json (provenance)
  checksums.json      sha256 of every file above
The folder is written under a temporary name and renamed into place (atomic)."""
from .native import collect_tensors, load_compressed, load_model, save, verify

__all__ = ["collect_tensors", "load_compressed", "load_model", "save", "verify"]
