"""Export and reload. The native format is a folder:
  model.safetensors   plain tensors (unquantized floating ones in the storage dtype, 16-bit by default)
                      + each compressed module's tensors under `<module name>.<key>`
  modelpress.json     manifest: format version, dtype (the compute dtype), storage {dtype, upcast: tensors
                      stored narrower than the compute dtype}, compressed modules {name: {kind, config}},
                      tied aliases (also onto a compressed module's weight), sha256 of every tensor
  config.json, tokenizer files, recipe.yaml, report.json, calibration.json (provenance)
  checksums.json      sha256 of every file above
The folder is written under a temporary name and renamed into place (atomic)."""
from .native import collect_tensors, load_compressed, load_model, save, verify

__all__ = ["collect_tensors", "load_compressed", "load_model", "save", "verify"]
