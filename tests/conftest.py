import os
import sys

import pytest

# Tests import their in-process helpers (tokenizers, tiny models) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
# ... and the recipe's model helpers (SmolLM2 from its GGUF, the tiny random Llama) from recipes/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def one_process_variants(tmp_path_factory) -> dict[str, dict]:
    """The one-process reference for the scale-out tests (test_deepspeed.py, test_multi_node.py): every model
    variant of tests/dist_scripts/train_one_step.py, one SGD step over the 8 examples at batch 8, then
    evaluated; ``{variant: result}`` (see ``test_distributed._read_result``). Run once per session."""
    from dist_scripts.train_one_step import VARIANTS
    from test_distributed import SCRIPT, _execute, read_variants

    out = str(tmp_path_factory.mktemp("one_process"))
    command = [sys.executable, SCRIPT, "--out", out, "--per-device-batch", "8", "--accumulation", "1"]
    _execute([*command, "--variants", ",".join(VARIANTS), "--evaluate"], timeout_s=300)
    return read_variants(out, VARIANTS)
