"""Chat masking on real tokenizers: exactly the assistant contents and their end-of-turn tokens train."""

from __future__ import annotations

import pytest
from chat_tokenizers import (
    llama3_style_tokenizer,
    mistral_slow_tokenizer,
    mistral_tokenizer,
    smollm2_tokenizer,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hf_shift_loss.data.chat import IGNORE_INDEX, encode_messages

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
        ({"last_turn_only": True}, ["A2<|im_end|>"]),
        ({"last_turn_only": True, "train_end_of_turn": "none"}, ["A2"]),
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
    with pytest.raises(ValueError, match=r"example 4, message 1 \(role 'assistant'\).*rewrites or drops"):
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
        ("hello", r"example 7: 'messages' must be a non-empty list"),
        ([], r"example 7: 'messages' must be a non-empty list"),
        ([{"role": "user", "content": "q"}, "answer"], r"example 7, message 1: expected a dict"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant"}],
            r"example 7, message 1: missing key 'content'",
        ),
        (
            [{"content": "q"}, {"role": "assistant", "content": "a"}],
            r"example 7, message 0: missing key 'role'",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}],
            r"example 7, message 1.*must be a str",
        ),
        (
            [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}],
            r"example 7, message 0: unknown role 'human'",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            r"example 7: no message has a trained role",
        ),
    ],
)
def test_malformed_conversations_name_example_and_message(messages, match):
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
    encoded = encode_messages(tokenizer, messages)
    assert encoded["input_ids"] == encoding["input_ids"]
    trained_chars: set[int] = set()
    for (start, end), label in zip(encoding["offset_mapping"], encoded["labels"], strict=True):
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
