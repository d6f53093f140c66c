#!/usr/bin/env bash
# Idempotent set-up of llm-compressor (PyPI llmcompressor 0.14.x) in its own venv .venv-llmc,
# used only by benchmarks/vs_llmcompressor.py (through benchmarks/_llmc_runner.py).
# torch is installed FIRST and pinned to the CPU 2.13.0 wheel (constraints file), so no CUDA torch
# is ever pulled by llmcompressor's or auto-round's requirements.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${LLMC_VENV:-$ROOT/.venv-llmc}"
PY="${PY:-python3}"
LLMC_SPEC="${LLMC_SPEC:-llmcompressor>=0.14,<0.15}"
STAMP="$VENV/.installed-llmc"

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import llmcompressor, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  echo "llm-compressor venv ready: $VENV ($("$VENV/bin/python" -c 'import llmcompressor; print(llmcompressor.__version__)'))"
  exit 0
fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
CONS="$(mktemp)"; trap 'rm -f "$CONS"' EXIT
echo "torch==2.13.0" > "$CONS"
"$VENV/bin/pip" install -q -c "$CONS" torch==2.13.0
"$VENV/bin/pip" install -q -c "$CONS" "$LLMC_SPEC" psutil
"$VENV/bin/python" - <<'PY'
import torch, llmcompressor, compressed_tensors, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, "a CUDA torch slipped in"
print("llmcompressor", llmcompressor.__version__, "compressed-tensors", compressed_tensors.__version__,
      "transformers", transformers.__version__, "torch", torch.__version__)
PY
touch "$STAMP"
