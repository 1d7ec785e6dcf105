"""Per-row ``tools`` and ``chat_template_kwargs`` reach the template; structured content trains as its text
(hf_shift_loss/data/content.py through the Encoder)."""

from __future__ import annotations

import copy
import json

import pytest
from chat_tokenizers import smollm2_tokenizer

from hf_shift_loss.data import Encoder

# A ChatML template that renders tools (never trained), a kwarg, and content given as a string or as parts.
TOOLS_AND_PARTS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- else %}{% for part in message.content %}{{ part.text }}{% endfor %}{% endif %}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if reasoning %}<|im_start|>system\nreasoning: {{ reasoning }}<|im_end|>\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int", "b": "int"}}}]
MESSAGES = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = copy.deepcopy(smollm2_tokenizer())
    tokenizer.chat_template = TOOLS_AND_PARTS_TEMPLATE
    return tokenizer


def rendered_ids(tokenizer, messages, **kwargs):
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    )


def trained_text(tokenizer, encoded):
    return tokenizer.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != -100]
    )


@pytest.mark.parametrize("tools", [TOOLS, json.dumps(TOOLS)], ids=["list", "json-string"])
def test_per_row_tools_reach_the_template_and_are_never_trained(tokenizer, tools):
    encoded = Encoder(tokenizer)({"messages": MESSAGES, "tools": tools})
    assert encoded["input_ids"] == rendered_ids(tokenizer, MESSAGES, tools=TOOLS)
    assert "Tools:" in tokenizer.decode(encoded["input_ids"])
    assert trained_text(tokenizer, encoded) == "5<|im_end|>"


def test_per_row_kwargs_win_over_the_runs_and_merge_with_them(tokenizer):
    encoder = Encoder(tokenizer, chat_template_kwargs={"reasoning": "low", "tools": TOOLS})
    row = {"messages": MESSAGES, "chat_template_kwargs": {"reasoning": "high"}}
    encoded = encoder(row)
    assert encoded["input_ids"] == rendered_ids(tokenizer, MESSAGES, tools=TOOLS, reasoning="high")
    assert encoder({"messages": MESSAGES})["input_ids"] == rendered_ids(
        tokenizer, MESSAGES, tools=TOOLS, reasoning="low"
    )
    assert trained_text(tokenizer, encoded) == "5<|im_end|>"


def as_parts(messages, split_at=1):
    return [
        {
            **m,
            "content": [
                {"type": "text", "text": m["content"][:split_at]},
                {"type": "text", "text": m["content"][split_at:]},
            ],
        }
        for m in messages
    ]


@pytest.mark.parametrize("template", ["parts", "smollm2"])
def test_structured_content_trains_the_tokens_of_its_text(tokenizer, template):
    tok = tokenizer if template == "parts" else smollm2_tokenizer()
    messages = [
        *MESSAGES,
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8."},
    ]
    encoder = Encoder(tok)
    as_text = encoder({"messages": messages})
    structured = encoder({"messages": as_parts(messages, split_at=2)})
    assert structured == as_text
    if template == "parts":  # passed through, the template renders the same ids as for the parts
        assert structured["input_ids"] == rendered_ids(tok, as_parts(messages, split_at=2))
    prompt_completion = encoder({"prompt": as_parts(messages[:1]), "completion": as_parts(messages[1:2])})
    assert prompt_completion == encoder({"prompt": messages[:1], "completion": messages[1:2]})


def test_a_non_text_part_says_multimodal_is_not_supported(tokenizer):
    row = {"messages": [{"role": "user", "content": [{"type": "image", "url": "cat.png"}]}, MESSAGES[1]]}
    with pytest.raises(ValueError, match=r"row 7, message 0: content part of type 'image'.*multimodal SFT"):
        Encoder(tokenizer)(row, 7)


def test_a_template_that_renders_parts_its_own_way_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS_AND_PARTS_TEMPLATE.replace("{{ part.text }}", "{{ part.text }} ")
    with pytest.raises(ValueError, match="row 3: the chat template renders structured content differently"):
        Encoder(tok)({"messages": as_parts(MESSAGES)}, 3)


@pytest.mark.parametrize(
    "column, value", [("tools", json.dumps(TOOLS)), ("chat_template_kwargs", {"reasoning": "high"})]
)
def test_template_columns_on_rows_no_template_renders_are_refused(tokenizer, column, value):
    with pytest.raises(ValueError, match=f"row 2: has '{column}' but is not a conversation"):
        Encoder(tokenizer)({"prompt": "2+3=", "completion": "5", column: value}, 2)


def test_the_batched_encoder_renders_such_rows_on_their_own(tokenizer):
    """encode_batch (what prepare_dataset maps) gives each row exactly what the row-by-row encoder gives."""
    rows = [
        {"messages": MESSAGES, "tools": json.dumps(TOOLS), "chat_template_kwargs": {"reasoning": "high"}},
        {"messages": MESSAGES, "tools": None, "chat_template_kwargs": None},
        {"messages": as_parts(MESSAGES), "tools": None, "chat_template_kwargs": None},
    ]
    encoder = Encoder(tokenizer, chat_template_kwargs={"reasoning": "low"})
    batch = encoder.encode_batch({key: [row[key] for row in rows] for key in rows[0]}, [0, 1, 2])
    assert batch["input_ids"] == [encoder(row, i)["input_ids"] for i, row in enumerate(rows)]
    assert batch["labels"] == [encoder(row, i)["labels"] for i, row in enumerate(rows)]
    assert batch["input_ids"][0] != batch["input_ids"][1]  # the tools and the kwarg reached row 0
