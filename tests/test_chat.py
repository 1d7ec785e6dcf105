"""Chat masking on real tokenizers: exactly the assistant contents and their end-of-turn tokens train."""

from __future__ import annotations

import random
import zlib

import datasets
import pytest
from chat_tokenizers import (
    LLAMA3_TEMPLATE,
    llama3_style_tokenizer,
    mistral_slow_tokenizer,
    mistral_tokenizer,
    qwen25_tools_tokenizer,
    smollm2_tokenizer,
)
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.data import chat, chat_truncate
from hf_shift_loss.data.chat import encode_messages
from hf_shift_loss.data.encode import Encoder
from hf_shift_loss.data.prepare import prepare_dataset

# Unicode, leading/trailing spaces and newlines, assistant text repeating user text, and contents equal
# to words of the template's own headers ("user", "assistant").
CONVERSATION = [
    {"role": "user", "content": "  Translate 你好 into English, please 😀\n"},
    {"role": "assistant", "content": " Translate 你好 into English, please 😀\n"},
    {"role": "user", "content": "assistant"},
    {"role": "assistant", "content": "user"},
    {"role": "user", "content": "Now say it with an emoji."},
    {"role": "assistant", "content": "Hello 👋  \n\nHello!"},
]
ASSISTANT_CONTENTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def trained_runs(encoded: dict) -> list[list[int]]:
    """Contiguous runs of trained token ids (one per trained turn when turns are separated)."""
    runs: list[list[int]] = []
    previous_trained = False
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token, "labels are aligned with input_ids (the loss shifts, not the collator)"
            if not previous_trained:
                runs.append([])
            runs[-1].append(token)
        previous_trained = trained
    return runs


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


@pytest.mark.parametrize(
    ("make_tokenizer", "end_of_turn"),
    [(smollm2_tokenizer, "<|im_end|>"), (llama3_style_tokenizer, "<|eot_id|>")],
    ids=["chatml-smollm2", "llama3-headers"],
)
def test_byte_level_templates_train_exactly_assistant_content_and_end_of_turn(make_tokenizer, end_of_turn):
    tokenizer = make_tokenizer()
    encoded = encode_messages(tokenizer, CONVERSATION, example_index=0)
    # Same ids as the template's own tokenization: one BOS at most, no double BOS.
    assert encoded["input_ids"] == chat_ids(tokenizer, CONVERSATION)
    assert encoded["truncated_tokens"] == 0 and encoded["dropped_turns"] == 0
    decoded = [tokenizer.decode(run) for run in trained_runs(encoded)]
    assert decoded == [content + end_of_turn for content in ASSISTANT_CONTENTS]


def test_smollm2_injected_default_system_prompt_stays_masked():
    tokenizer = smollm2_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "You are a helpful"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant")  # injected by the template
    encoded = encode_messages(tokenizer, messages)
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == ["You are a helpful<|im_end|>"]


def test_mistral_inst_template_sentencepiece():
    tokenizer = mistral_tokenizer()
    encoded = encode_messages(tokenizer, CONVERSATION)
    assert encoded["input_ids"] == chat_ids(tokenizer, CONVERSATION)
    assert encoded["input_ids"].count(tokenizer.bos_token_id) == 1
    # SentencePiece's word-initial "▁" joins the template's space before an answer to the answer's first
    # word (one token) and decode drops a leading space: compare up to that single leading space.
    decoded = [tokenizer.decode(run) for run in trained_runs(encoded)]
    assert [d.lstrip(" ") for d in decoded] == [c.lstrip(" ") + "</s>" for c in ASSISTANT_CONTENTS]


def test_slow_tokenizer_without_offsets_masks_like_the_fast_one():
    fast, slow = mistral_tokenizer(), mistral_slow_tokenizer()
    assert "offset_mapping" not in slow("a", return_offsets_mapping=True)
    assert encode_messages(slow, CONVERSATION) == encode_messages(fast, CONVERSATION)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"train_end_of_turn": "none"}, ["A1", "A2"]),
        ({"train_end_of_turn": "last"}, ["A1", "A2<|im_end|>"]),
        ({"train_on": "last_turn"}, ["A2<|im_end|>"]),
        ({"train_on": "last_turn", "train_end_of_turn": "none"}, ["A2"]),
        # "all": every message's end of turn (system and user content stay masked)
        (
            {"train_end_of_turn": "all"},
            ["<|im_end|>", "<|im_end|>", "A1<|im_end|>", "<|im_end|>", "A2<|im_end|>"],
        ),
        (
            {"train_roles": ("assistant", "user")},
            ["U1<|im_end|>", "A1<|im_end|>", "U2<|im_end|>", "A2<|im_end|>"],
        ),
    ],
)
def test_end_of_turn_and_turn_options(options, expected):
    tokenizer = smollm2_tokenizer()
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    encoded = encode_messages(tokenizer, messages, **options)
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == expected


def test_whitespace_between_content_and_end_of_turn_is_trained():
    # A template that puts "\n" before the marker: the model has to generate it to reach the marker.
    tokenizer = llama3_style_tokenizer()
    template = tokenizer.chat_template.replace("'<|eot_id|>'", "'\\n<|eot_id|>'")
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    encoded = encode_messages(tokenizer, messages, chat_template_kwargs={"chat_template": template})
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == ["A\n<|eot_id|>"]


def test_template_that_trims_content_falls_back_to_the_stripped_content():
    tokenizer = llama3_style_tokenizer()
    template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    messages = [{"role": "user", "content": " Q "}, {"role": "assistant", "content": "\n  A answer  \n"}]
    encoded = encode_messages(tokenizer, messages, chat_template_kwargs={"chat_template": template})
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == ["A answer<|eot_id|>"]


def test_template_that_rewrites_content_is_a_clear_error():
    tokenizer = llama3_style_tokenizer()
    template = tokenizer.chat_template.replace("message['content']", "message['content'] | upper")
    messages = [{"role": "user", "content": "QUESTION"}, {"role": "assistant", "content": "answer"}]
    with pytest.raises(ValueError, match=r"row 4, message 1 \(role 'assistant'\).*rewrites or drops"):
        encode_messages(
            tokenizer, messages, chat_template_kwargs={"chat_template": template}, example_index=4
        )


def test_max_length_drops_oldest_exchanges_keeps_system_and_counts():
    tokenizer = smollm2_tokenizer()
    system = {"role": "system", "content": "Be brief."}
    exchanges = [
        [
            {"role": "user", "content": f"Question number {i} " * 5},
            {"role": "assistant", "content": f"Answer {i}"},
        ]
        for i in range(3)
    ]
    messages = [system] + [m for exchange in exchanges for m in exchange]
    full = encode_messages(tokenizer, messages)
    last_only = encode_messages(tokenizer, [system] + exchanges[2])
    two_last = encode_messages(tokenizer, [system] + exchanges[1] + exchanges[2])
    assert len(last_only["input_ids"]) < len(two_last["input_ids"]) < len(full["input_ids"])

    encoded = encode_messages(tokenizer, messages, max_length=len(two_last["input_ids"]) - 1)
    assert encoded["dropped_turns"] == 4 and encoded["truncated_tokens"] == 0
    assert encoded["input_ids"] == last_only["input_ids"] and encoded["labels"] == last_only["labels"]
    assert tokenizer.decode(encoded["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")

    encoded = encode_messages(tokenizer, messages, max_length=len(two_last["input_ids"]))
    assert encoded["dropped_turns"] == 2 and encoded["input_ids"] == two_last["input_ids"]

    encoded = encode_messages(tokenizer, messages, max_length=len(full["input_ids"]))
    assert encoded == full


def test_max_length_truncates_the_last_exchange_from_the_right_when_still_too_long():
    tokenizer = smollm2_tokenizer()
    messages = [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "new question"},
        {"role": "assistant", "content": "a long new answer " * 10},
    ]
    last_only = encode_messages(tokenizer, messages[2:])
    encoded = encode_messages(tokenizer, messages, max_length=len(last_only["input_ids"]) - 7)
    assert encoded["dropped_turns"] == 2 and encoded["truncated_tokens"] == 7
    assert encoded["input_ids"] == last_only["input_ids"][:-7]
    assert encoded["labels"] == last_only["labels"][:-7]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", r"row 7: 'messages' must be a non-empty list"),
        ([], r"row 7: 'messages' must be a non-empty list"),
        ([{"role": "user", "content": "q"}, "answer"], r"row 7, message 1: expected a dict"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant"}],
            r"row 7, message 1: missing key 'content'",
        ),
        (
            [{"content": "q"}, {"role": "assistant", "content": "a"}],
            r"row 7, message 0: missing key 'role'",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}],
            r"row 7, message 1.*must be a str",
        ),
        (
            [{"role": 3, "content": "q"}, {"role": "assistant", "content": "a"}],
            r"row 7, message 0: 'role' must be a non-empty str",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}],
            r"row 7, message 1 \(role 'assistant'\): content must be a str, got list",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5, "tool_calls": [{}]}],
            r"row 7, message 1 \(role 'assistant'\): content must be a str or None next to 'tool_calls'",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": "f()"}],
            r"row 7, message 1 \(role 'assistant'\): 'tool_calls' must be a list",
        ),
        (  # empty tool_calls: a plain message again, which needs its content
            [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": []}],
            r"row 7, message 1: missing key 'content'",
        ),
    ],
)
def test_malformed_conversations_name_row_and_message(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(smollm2_tokenizer(), messages, example_index=7)


def test_bad_options_are_rejected():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="train_end_of_turn"):
        encode_messages(smollm2_tokenizer(), messages, train_end_of_turn="always")
    with pytest.raises(ValueError, match="max_length"):
        encode_messages(smollm2_tokenizer(), messages, max_length=0)
    # A single role name is accepted as a string (not iterated character by character).
    assert trained_runs(encode_messages(smollm2_tokenizer(), messages, train_roles="assistant"))
    with pytest.raises(ValueError, match="train_on must be 'completion', 'all' or 'last_turn', got 'last'"):
        encode_messages(smollm2_tokenizer(), messages, train_on="last")


def test_encode_messages_speaks_train_on_as_the_encoder_does():
    tokenizer = smollm2_tokenizer()
    for train_on in ("completion", "last_turn", "all"):
        row = Encoder(tokenizer, max_length=20, train_on=train_on)({"messages": CONVERSATION})
        encoded = encode_messages(tokenizer, CONVERSATION, max_length=20, train_on=train_on)
        assert encoded == {key: row[key] for key in encoded}, train_on
    everything = encode_messages(tokenizer, CONVERSATION, train_on="all")
    assert everything["labels"] == everything["input_ids"]
    every_turn = trained_runs(encode_messages(tokenizer, CONVERSATION, train_on="completion"))
    assert len(every_turn) == 3
    assert trained_runs(encode_messages(tokenizer, CONVERSATION, train_on="last_turn")) == every_turn[-1:]


@pytest.mark.parametrize(("last_turn_only", "train_on"), [(True, "last_turn"), (False, "completion")])
def test_last_turn_only_still_works_for_one_release_with_a_future_warning(last_turn_only, train_on):
    tokenizer = smollm2_tokenizer()
    with pytest.warns(
        FutureWarning, match=f"last_turn_only={last_turn_only}.*use train_on='{train_on}'"
    ) as record:
        old = encode_messages(tokenizer, CONVERSATION, last_turn_only=last_turn_only)
    assert record[0].filename == __file__  # the warning points at the caller, not at the library
    assert old == encode_messages(tokenizer, CONVERSATION, train_on=train_on)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="pass train_on only"):
        encode_messages(tokenizer, CONVERSATION, last_turn_only=last_turn_only, train_on="all")


# ---------------------------------------------------------------- property test (ChatML by hand)
CHAT_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \n\t.,!?abcXYZ你好世界😀👋é")),
        # Assigned code points only: SmolLM2's vocabulary lacks a few UTF-8 lead bytes (unassigned planes).
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cn", "Co")),
    ),
    max_size=30,
)


@st.composite
def conversations(draw) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": draw(CHAT_TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(CHAT_TEXT)})
        messages.append({"role": "assistant", "content": draw(CHAT_TEXT)})
    return messages


def render_chatml(messages: list[dict[str, str]]) -> tuple[str, list[tuple[str, int, int]]]:
    """SmolLM2's template written out by hand, with every content's (role, start, end) span."""
    text, spans = "", []
    if messages[0]["role"] != "system":
        text += "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        spans.append(("system", len("<|im_start|>system\n"), len(text) - len("<|im_end|>\n")))
    for message in messages:
        text += f"<|im_start|>{message['role']}\n"
        spans.append((message["role"], len(text), len(text) + len(message["content"])))
        text += message["content"] + "<|im_end|>\n"
    return text, spans


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations())
def test_property_only_assistant_content_and_its_end_of_turn_are_trained(messages):
    tokenizer = smollm2_tokenizer()
    text, spans = render_chatml(messages)
    assume(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text)  # lossless text
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # The template's tokens, except where a token straddles an answer's start: there the text is
    # tokenized in two pieces, as the prompt (ending "assistant\n") and the answer are at generation.
    starts = sorted({s for role, s, _ in spans if role == "assistant"})
    straddled = [b for b in starts if any(s < b < e for s, e in encoding["offset_mapping"])]
    ids, offsets = [], []
    for piece_start, piece_end in zip([0, *straddled], [*straddled, len(text)], strict=True):
        piece = tokenizer(text[piece_start:piece_end], add_special_tokens=False, return_offsets_mapping=True)
        ids += piece["input_ids"]
        offsets += [(piece_start + s, piece_start + e) for s, e in piece["offset_mapping"]]
    encoded = encode_messages(tokenizer, messages)
    assert encoded["input_ids"] == ids
    trained_chars: set[int] = set()
    for (start, end), label in zip(offsets, encoded["labels"], strict=True):
        if label == IGNORE_INDEX:
            continue
        trained_chars.update(range(start, end))
        for role, span_start, span_end in spans:
            if role != "assistant":
                assert not (span_start <= start and end <= span_end), (
                    f"token {text[start:end]!r} is {role} text"
                )
        # Every trained token touches an assistant content or is its end-of-turn marker.
        touches_assistant = any(
            role == "assistant" and start < span_end + len("<|im_end|>") and end > span_start
            for role, span_start, span_end in spans
        )
        assert touches_assistant, f"trained token {text[start:end]!r} is outside every assistant turn"
    for role, span_start, span_end in spans:
        if role == "assistant":
            assert set(range(span_start, span_end)) <= trained_chars, "assistant content not fully trained"
            assert set(range(span_end, span_end + len("<|im_end|>"))) <= trained_chars, (
                "end of turn untrained"
            )


def test_system_and_tool_turns_stay_masked_and_custom_roles_can_be_trained():
    tokenizer = llama3_style_tokenizer()
    messages = [
        {"role": "system", "content": "You call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": 'get_weather("Paris")'},
        {"role": "tool", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "21 °C in Paris."},
    ]
    encoded = encode_messages(tokenizer, messages)
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == [
        'get_weather("Paris")<|eot_id|>',
        "21 °C in Paris.<|eot_id|>",
    ]
    messages[2] = {"role": "planner", "content": "look it up"}  # a role of the user's own, trained
    encoded = encode_messages(tokenizer, messages, train_roles=("assistant", "planner"))
    assert [tokenizer.decode(run) for run in trained_runs(encoded)][0] == "look it up<|eot_id|>"


# ------------------------------------------------------- untrainable conversations follow on_untrained
def test_conversation_without_a_trainable_message_is_encoded_fully_masked():
    tokenizer = smollm2_tokenizer()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "only a question"}]
    encoded = encode_messages(tokenizer, messages, example_index=7, max_length=8)
    assert encoded["input_ids"] == chat_ids(tokenizer, messages)[:8]
    assert set(encoded["labels"]) == {IGNORE_INDEX} and encoded["truncated_completion"] == 0
    # A conversational prompt with an empty completion: nothing after the context is trainable.
    prompt = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert set(encode_messages(tokenizer, prompt, context_messages=2)["labels"]) == {IGNORE_INDEX}


def test_untrainable_conversations_are_dropped_and_counted_or_refused_by_row():
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "no answer"}]},
    ]
    encoder = Encoder(smollm2_tokenizer())
    assert encoder(rows[1], 1)["trained_tokens"] == 0
    prepared = prepare_dataset(datasets.Dataset.from_list(rows), encoder, on_untrained="drop")
    assert len(prepared.dataset) == 1 and prepared.stats.untrained_examples == 2
    with pytest.raises(ValueError, match=r"train set, row 1: no trained token"):
        prepare_dataset(datasets.Dataset.from_list(rows), encoder, on_untrained="raise")


def test_template_errors_become_value_errors_naming_the_row():
    tokenizer = mistral_tokenizer()  # its template raises on roles other than user and assistant
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match=r"row 5: the chat template cannot render this conversation"):
        Encoder(tokenizer)({"messages": messages}, 5)


# ---------------------------------------------------------------------------------- tool calls
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(city: str, **extra: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city, **extra}}}


TOOL_CONVERSATION = [
    {"role": "system", "content": "You call tools."},
    {"role": "developer", "content": "Answer in French."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [call("Paris")]},  # content absent
    {"role": "tool", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "Lyon and Nice too.", "tool_calls": [call("Lyon"), call("Nice")]},
    {"role": "tool", "content": '{"celsius": 19}'},
    {"role": "tool", "content": '{"celsius": 25}'},
    {"role": "assistant", "content": "21 °C à Paris."},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": None, "tool_calls": [call("Paris", day="tomorrow")]},
]
TOOL_CALL_RUNS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    'Lyon and Nice too.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call><|im_end|>',
    "21 °C à Paris.<|im_end|>",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "day": "tomorrow"}}\n</tool_call>'
    "<|im_end|>",
]


@pytest.mark.parametrize("tools", [[WEATHER_TOOL], None], ids=["tools-schema", "no-tools"])
def test_tool_calls_are_trained_as_rendered_tool_results_schemas_and_developer_are_not(tools):
    tokenizer = qwen25_tools_tokenizer()
    kwargs = {"tools": tools} if tools else {}
    encoded = encode_messages(tokenizer, TOOL_CONVERSATION, chat_template_kwargs=kwargs)
    ids = list(tokenizer.apply_chat_template(TOOL_CONVERSATION, tokenize=True, **kwargs)["input_ids"])
    assert encoded["input_ids"] == ids
    text = tokenizer.decode(ids)
    assert ('"description": "The weather in a city"' in text) == bool(tools)  # the schema is rendered
    assert "<|im_start|>developer\nAnswer in French.<|im_end|>" in text
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == TOOL_CALL_RUNS


def test_tool_calls_with_trained_tool_role_and_last_turn_only():
    tokenizer = qwen25_tools_tokenizer()
    encoded = encode_messages(tokenizer, TOOL_CONVERSATION, train_on="last_turn")
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == TOOL_CALL_RUNS[-1:]
    encoded = encode_messages(tokenizer, TOOL_CONVERSATION[:5], train_roles=("assistant", "tool"))
    # The tool result's content is trained; its end of turn is the first marker after it (the template's
    # own </tool_response>), and the tool turn's closing <|im_end|> is not part of the content.
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == [
        TOOL_CALL_RUNS[0],
        '{"celsius": 21}\n</tool_response>',
    ]


def test_tool_calls_survive_truncation_and_the_kept_part_matches_the_reference():
    tokenizer = qwen25_tools_tokenizer()
    kwargs = {"tools": [WEATHER_TOOL]}
    last_exchange = TOOL_CONVERSATION[:1] + TOOL_CONVERSATION[9:]
    kept = encode_messages(tokenizer, last_exchange, chat_template_kwargs=kwargs)
    encoded = encode_messages(
        tokenizer, TOOL_CONVERSATION, chat_template_kwargs=kwargs, max_length=len(kept["input_ids"])
    )
    assert encoded["dropped_turns"] == 8 and encoded["truncated_tokens"] == 0
    assert encoded["input_ids"] == kept["input_ids"] and encoded["labels"] == kept["labels"]
    for max_length in range(8, 400, 37):
        options = {"chat_template_kwargs": kwargs, "max_length": max_length}
        assert encode_messages(tokenizer, TOOL_CONVERSATION, **options) == reference_encode_messages(
            tokenizer, TOOL_CONVERSATION, **options
        )


def test_a_template_without_tool_support_is_a_clear_error():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("Paris")]}]
    with pytest.raises(ValueError, match=r"row 2: the chat template cannot render this conversation"):
        encode_messages(smollm2_tokenizer(), messages, example_index=2)


def test_tool_call_as_last_message_and_a_template_with_its_own_tool_call_header():
    # Mistral-style: the call has its own header ([TOOL_CALLS]) instead of the plain answer's " ": it
    # is kept in the trained span; only the scaffolding shared with plain answers is left out.
    tokenizer = llama3_style_tokenizer()
    template = LLAMA3_TEMPLATE.replace(
        "message['content'] + '<|eot_id|>'",
        "(('[TOOL_CALLS]' + message['tool_calls'] | map(attribute='function') | list | tojson) "
        "if message['tool_calls'] is defined else message['content']) + '<|eot_id|>'",
    )
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [call("Paris")]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "tool_calls": [call("Nice")]},
    ]
    encoded = encode_messages(tokenizer, messages, chat_template_kwargs={"chat_template": template})
    assert [tokenizer.decode(run) for run in trained_runs(encoded)] == [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]<|eot_id|>',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Nice"}}]<|eot_id|>',
    ]


# ------------------------------------------- linear-time truncation = the old one-exchange-at-a-time loop
def reference_encode_messages(
    tokenizer,
    messages,
    *,
    train_roles=("assistant",),
    train_end_of_turn="turn",
    train_on="completion",
    max_length=None,
    chat_template_kwargs=None,
    example_index=None,
    context_messages=0,
):
    """The previous algorithm, kept as the reference: drop the oldest exchange, re-render, re-tokenize,
    until it fits (quadratic in the conversation's length)."""
    roles = (train_roles,) if isinstance(train_roles, str) else tuple(train_roles)
    messages = chat.validate_messages(messages, example_index)
    options = dict(
        train_roles=roles,
        train_end_of_turn=train_end_of_turn,
        last_turn_only=train_on == "last_turn",
        chat_template_kwargs=dict(chat_template_kwargs or {}),
        example_index=example_index,
    )
    encoded = chat._encode(tokenizer, messages, first_trainable=context_messages, **options)
    input_ids, labels = encoded.input_ids, encoded.labels
    dropped_turns = 0
    if max_length is not None and len(input_ids) > max_length:
        n_system, starts = chat_truncate._exchanges(messages)
        for cut in starts[1:]:
            first_trainable = (
                context_messages
                if context_messages <= n_system
                else max(n_system + context_messages - cut, n_system)
            )
            kept = list(messages[:n_system]) + list(messages[cut:])
            if not any(m["role"] in roles for m in kept[first_trainable:]):
                break
            encoded = chat._encode(tokenizer, kept, first_trainable=first_trainable, **options)
            input_ids, labels = encoded.input_ids, encoded.labels
            dropped_turns = cut - n_system
            if len(input_ids) <= max_length:
                break
    truncated_tokens = truncated_completion = 0
    if max_length is not None and len(input_ids) > max_length:
        truncated_tokens = len(input_ids) - max_length
        truncated_completion = int(any(label != IGNORE_INDEX for label in labels[max_length:]))
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "truncated_tokens": truncated_tokens,
        "truncated_completion": truncated_completion,
        "dropped_turns": dropped_turns,
    }


# Templates whose output depends on the position in the conversation, so that the length after a cut
# is not the full length minus the dropped tokens: turn numbers in the headers (fewer digits once early
# turns are dropped), and a Llama-2 style system prompt merged into the first user turn.
NUMBERED_TEMPLATE = LLAMA3_TEMPLATE.replace(
    "message['role'] + '<|end_header_id|>",
    "message['role'] + ' ' + (loop.index * 7) | string + '<|end_header_id|>",
)
MERGED_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if ns.system %}{{ '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
WORDS = ["alpha", "beta", "你好", "😀", "x" * 9, "the", "quick", "brown", "fox", "\n", "  ", "42", "é"]


def random_conversation(rng: random.Random, *, user_assistant_only: bool = False) -> list[dict[str, str]]:
    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 1, 3, 8, 20])))

    messages = [{"role": "system", "content": text()} for _ in range(rng.choice([0, 0, 1, 2]))]
    if not user_assistant_only and rng.random() < 0.2:
        messages.append({"role": "assistant", "content": text()})  # an answer before any question
    for _ in range(rng.randint(1, 6)):
        messages.append({"role": "user", "content": text()})
        for _ in range(1 if user_assistant_only else rng.choice([0, 1, 1, 2])):
            role = "assistant" if user_assistant_only else rng.choice(["assistant", "assistant", "tool"])
            messages.append({"role": role, "content": text()})
    return messages


@pytest.mark.parametrize(
    ("make_tokenizer", "template", "user_assistant_only"),
    [
        (smollm2_tokenizer, None, False),
        (llama3_style_tokenizer, None, False),
        (llama3_style_tokenizer, NUMBERED_TEMPLATE, False),
        (mistral_tokenizer, MERGED_SYSTEM_TEMPLATE, True),
        (mistral_slow_tokenizer, MERGED_SYSTEM_TEMPLATE, True),
    ],
    ids=["chatml", "llama3", "numbered-headers", "merged-system", "merged-system-slow"],
)
def test_truncation_keeps_the_same_turns_and_masks_as_the_one_exchange_at_a_time_reference(
    make_tokenizer, template, user_assistant_only
):
    tokenizer = make_tokenizer()
    rng = random.Random(zlib.crc32((make_tokenizer.__name__ + str(template)).encode()))  # not hash(): salted
    compared = dropped = 0
    for _ in range(12 if tokenizer.is_fast else 4):
        messages = random_conversation(rng, user_assistant_only=user_assistant_only)
        options = {"chat_template_kwargs": {"chat_template": template} if template else {}}
        options |= rng.choice(
            [
                {},
                {"train_on": "last_turn"},
                {"train_roles": ("assistant", "user")},
                {"train_roles": ("system", "assistant")},
                {"context_messages": rng.randint(0, len(messages))},
                {"train_end_of_turn": "all"},
            ]
        )
        full_length = len(encode_messages(tokenizer, messages, **options)["input_ids"])
        for max_length in sorted({1, 2, 7, full_length // 3, full_length // 2, full_length - 1, full_length}):
            if max_length < 1:
                continue
            encoded = encode_messages(tokenizer, messages, max_length=max_length, **options)
            assert encoded == reference_encode_messages(
                tokenizer, messages, max_length=max_length, **options
            ), (
                messages,
                options,
                max_length,
            )
            compared += 1
            dropped += encoded["dropped_turns"] > 0
    assert dropped > compared // 4  # the cases exercise the dropping, not only the right cut


def test_truncation_renders_a_constant_number_of_times_whatever_the_length(monkeypatch):
    tokenizer = smollm2_tokenizer()
    messages = [{"role": "system", "content": "S"}]
    for i in range(60):
        messages += [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    calls = []
    original = chat._encode
    for module in (chat, chat_truncate):  # the whole conversation (chat), the cuts (chat_truncate)
        monkeypatch.setattr(
            module, "_encode", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
        )
    encoded = encode_messages(tokenizer, messages, max_length=64)
    # The whole conversation once, the chosen cut, and the cut before it (which must not fit).
    assert len(calls) == 3 and encoded["dropped_turns"] > 100
    assert encoded == reference_encode_messages(tokenizer, messages, max_length=64)


# ------------------------------------------------------------------ fuzz: the encoder's whole contract
FUZZ_TEXT = st.one_of(
    CHAT_TEXT,
    st.just(""),
    st.builds(lambda text, times: text * times, CHAT_TEXT, st.integers(2, 60)),  # long texts
)
FUZZ_ROW = 3


@st.composite
def fuzz_conversations(draw) -> list:
    messages = []
    for _ in range(draw(st.integers(1, 10))):
        role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
        if draw(st.integers(0, 29)) == 0:  # now and then a malformed message
            messages.append(
                draw(st.sampled_from([{"role": role, "content": None}, {"role": role}, "text", {}]))
            )
        else:
            messages.append({"role": role, "content": draw(FUZZ_TEXT)})
    return messages


def tokenize_as_generation_sees_it(tokenizer, text: str, assistant_starts: list[int]) -> dict[str, list]:
    """The rendered text's tokens, cut where a token of the whole text would straddle an assistant turn's
    start: there the context ends with the generation prompt (``<|im_start|>assistant\\n``) as a piece of
    its own, as it does at generation time (``add_generation_prompt=True``)."""
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    cuts = [cut for cut in assistant_starts if any(a < cut < b for a, b in whole["offset_mapping"])]
    input_ids, offsets = [], []
    for piece_start, piece_end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        piece = tokenizer(text[piece_start:piece_end], add_special_tokens=False, return_offsets_mapping=True)
        input_ids += piece["input_ids"]
        offsets += [(piece_start + a, piece_start + b) for a, b in piece["offset_mapping"]]
    return {"input_ids": input_ids, "offset_mapping": offsets}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(messages=[{"role": "assistant", "content": " "}], max_length=None)  # BPE: "\n" + " " merge
@example(messages=[{"role": "assistant", "content": " "}], max_length=2)
@given(messages=fuzz_conversations(), max_length=st.one_of(st.none(), st.integers(2, 300)))
def test_fuzz_encoder_returns_aligned_assistant_only_labels_or_a_value_error_naming_the_row(
    messages, max_length
):
    tokenizer = smollm2_tokenizer()
    encoder = Encoder(tokenizer, max_length=max_length)
    malformed = any(not isinstance(m, dict) or not isinstance(m.get("content"), str) for m in messages)
    try:
        encoded = encoder({"messages": messages}, FUZZ_ROW)
    except ValueError as error:
        event("ValueError")
        assert f"row {FUZZ_ROW}" in str(error)
        assert malformed, f"well-formed ChatML conversation refused: {error}"
        return
    assert not malformed
    event(
        f"dropped turns: {encoded['dropped_turns'] > 0}, cut from the right: {encoded['truncated_tokens'] > 0}"
    )
    assert encoded == {
        **reference_encode_messages(tokenizer, messages, max_length=max_length),
        "trained_tokens": encoded["trained_tokens"],
        "blank_completion": 0,
        # A special-token string typed in a content (counted, tokenized as the control token: ChatML's).
        "special_tokens_in_content": int(
            any(special in m["content"] for m in messages for special in tokenizer.all_special_tokens)
        ),
    }
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] == "system":
        n_system += 1
    kept = messages[:n_system] + messages[n_system + encoded["dropped_turns"] :]
    text, spans = render_chatml(kept)
    assert tokenizer.apply_chat_template(kept, tokenize=False) == text
    assistant_starts = [start for role, start, _ in spans if role == "assistant"]
    encoding = tokenize_as_generation_sees_it(tokenizer, text, assistant_starts)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(labels) == len(ids) and ids == encoding["input_ids"][: len(ids)]
    assert encoded["truncated_tokens"] == len(encoding["input_ids"]) - len(ids)
    assert max_length is None or len(ids) <= max_length
    assert encoded["trained_tokens"] == sum(label != IGNORE_INDEX for label in labels[1:])
    # Assistant content + its end-of-turn marker, as character ranges of the rendered text.
    assistant = [(start, end + len("<|im_end|>")) for role, start, end in spans if role == "assistant"]
    trained_chars: set[int] = set()
    for token, label, (start, end) in zip(ids, labels, encoding["offset_mapping"], strict=False):
        if label == IGNORE_INDEX:
            continue
        assert label == token
        trained_chars.update(range(start, end))
        region = next(((a, b) for a, b in assistant if start < b and end > a), None)
        assert region is not None, f"trained token {text[start:end]!r} is outside every assistant turn"
        # A token may straddle the turn's start only by the header's whitespace ("\n" + "\n..." merged).
        assert text[start : max(start, region[0])].isspace() or start >= region[0]
        assert end <= region[1]
    kept_chars = encoding["offset_mapping"][len(ids) - 1][1] if ids else 0
    for start, end in assistant:
        if end <= kept_chars:
            assert set(range(start, end)) <= trained_chars, "assistant turn not fully trained"


@pytest.mark.parametrize("answer", ["    return x\n", "\n\nPara.", " leading space"])
def test_the_trained_context_ends_exactly_where_generation_starts(answer):
    """BPE would merge the header's newline with an answer's leading whitespace: the context the model
    is trained on must be the prompt it gets at generation time (add_generation_prompt=True)."""
    tokenizer = smollm2_tokenizer()
    messages = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": answer}]
    encoded = encode_messages(tokenizer, messages)
    first = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert encoded["input_ids"][:first] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    trained = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == answer + "<|im_end|>"


# ------------------------------------------------------------------ batches: the same rows, encoded together
BATCH_TOKENIZERS = {
    "smollm2": smollm2_tokenizer,
    "mistral": mistral_tokenizer,
    "mistral_slow": mistral_slow_tokenizer,
    "llama3": llama3_style_tokenizer,
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.one_of(
            fuzz_conversations().map(lambda messages: {"messages": messages}),
            st.builds(lambda p, c: {"prompt": p, "completion": c}, CHAT_TEXT, CHAT_TEXT.filter(bool)),
            st.builds(lambda text: {"text": text}, CHAT_TEXT),
        ),
        min_size=1,
        max_size=8,
    ),
    max_length=st.one_of(st.none(), st.integers(2, 300)),
    options=st.sampled_from(
        [{}, {"train_on": "last_turn"}, {"train_on": "all"}, {"train_end_of_turn": "all"}]
    ),
)
def test_fuzz_a_batch_encodes_each_row_as_the_row_alone(rows, max_length, options):
    """encode_batch (one tokenizer call for the batch) = the encoder on each row, errors included."""
    encoder = Encoder(smollm2_tokenizer(), max_length=max_length, **options)
    indices = list(range(10, 10 + len(rows)))
    try:
        alone = [encoder(row, index) for row, index in zip(rows, indices, strict=True)]
    except ValueError as error:
        with pytest.raises(ValueError, match=r"row 1\d"):
            encoder.encode_batch(_columns(rows), indices)
        event(f"refused: {str(error)[:20]}")
        return
    batch = encoder.encode_batch(_columns(rows), indices)
    assert [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)] == alone


def _columns(rows: list[dict]) -> dict[str, list]:
    """Rows as the columns datasets gives a batched map (missing keys are None)."""
    names = sorted({name for row in rows for name in row})
    return {name: [row.get(name) for row in rows] for name in names}


@pytest.mark.parametrize("name", sorted(BATCH_TOKENIZERS))
def test_a_batch_of_conversations_encodes_each_as_encode_messages(name):
    tokenizer = BATCH_TOKENIZERS[name]()
    conversations = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello there."}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "\n\n6"},
        ],
        [{"role": "user", "content": "x " * 80}, {"role": "assistant", "content": "y " * 40}],
    ] * 2
    for max_length in (None, 30):
        batch = chat.encode_conversations(
            tokenizer,
            conversations,
            max_length=max_length,
            example_indices=range(6),
            context_messages=[0, 1] * 3,
        )
        alone = [
            encode_messages(tokenizer, c, max_length=max_length, example_index=i, context_messages=i % 2)
            for i, c in enumerate(conversations)
        ]
        assert batch == alone
