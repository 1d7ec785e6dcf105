"""One home per option vocabulary: each choice set declared once, every consumer checking it the same way."""

from __future__ import annotations

import pathlib
import re
from typing import get_args

import pytest
import torch
from datasets import Dataset
from helpers import tiny_llama, word_tokenizer
from transformers import HfArgumentParser

from hf_shift_loss import (
    PromptMaskingCollator,
    ShiftLossArguments,
    causal_lm_loss,
    encode_messages,
    fused_linear_cross_entropy,
    prepare_dataset,
)
from hf_shift_loss import options as opts
from hf_shift_loss.data.encode import Encoder
from hf_shift_loss.data.pack import pack_rows
from hf_shift_loss.loss import choose_loss_path

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hf_shift_loss"
VOCABULARIES = {
    opts.TrainOn: opts.TRAIN_ON,
    opts.EndOfTurnMode: opts.END_OF_TURN_MODES,
    opts.OnUntrained: opts.ON_UNTRAINED,
    opts.PackingOverflow: opts.PACKING_OVERFLOWS,
    opts.LossImpl: opts.LOSS_IMPLS,
    opts.Reduction: opts.REDUCTIONS,
}


def test_each_tuple_of_choices_is_derived_from_its_literal():
    for alias, choices in VOCABULARIES.items():
        assert choices == get_args(alias) and len(choices) >= 2


def test_no_choice_set_is_spelled_again_in_the_package():
    # Any two choices of a vocabulary, quoted and adjacent as in a Literal or a tuple, outside options.py.
    spelled = {
        re.compile(rf"[\"']{re.escape(first)}[\"'],\s*[\"']{re.escape(second)}[\"']"): choices
        for choices in VOCABULARIES.values()
        for first, second in zip(choices, choices[1:], strict=False)
    }
    found = [
        f"{path.relative_to(PACKAGE)}: {pattern.pattern}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "options.py"
        for pattern in spelled
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_arguments_take_their_choices_from_the_vocabularies():
    fields = {
        "train_on": opts.TRAIN_ON,
        "train_end_of_turn": opts.END_OF_TURN_MODES,
        "on_untrained": opts.ON_UNTRAINED,
        "packing_overflow": opts.PACKING_OVERFLOWS,
        "loss_impl": opts.LOSS_IMPLS,
    }
    parser = HfArgumentParser(ShiftLossArguments)
    choices = {action.dest: tuple(action.choices) for action in parser._actions if action.choices}
    assert {name: choices[name] for name in fields} == fields
    for name, allowed in fields.items():
        with pytest.raises(ValueError, match=f"^{name} must be .*{allowed[-1]!r}, got 'typo'$"):
            ShiftLossArguments(output_dir="out", **{name: "typo"})


def _rows():
    return [{"prompt": "where is the capital", "completion": "Beijing"}]


def _one_bad_value_each():
    """(consumer, option name, choices, call with the value 'typo')."""
    tokenizer = word_tokenizer()
    logits, labels = torch.randn(1, 3, 8), torch.tensor([[1, 2, 3]])
    hidden, weight = torch.randn(1, 3, 4), torch.randn(8, 4)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    encoded = {"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]}
    return [
        (
            "collator",
            "on_untrained",
            opts.ON_UNTRAINED,
            lambda: PromptMaskingCollator(tokenizer, on_untrained="typo"),
        ),
        (
            "prepare_dataset",
            "on_untrained",
            opts.ON_UNTRAINED,
            lambda: prepare_dataset(Dataset.from_list(_rows()), Encoder(tokenizer), on_untrained="typo"),
        ),
        (
            "prepare_dataset",
            "packing_overflow",
            opts.PACKING_OVERFLOWS,
            lambda: prepare_dataset(
                Dataset.from_list(_rows()),
                Encoder(tokenizer, max_length=8),
                packing=True,
                packing_overflow="typo",
            ),
        ),
        (
            "pack_rows",
            "packing_overflow",
            opts.PACKING_OVERFLOWS,
            lambda: pack_rows(encoded, 8, overflow="typo"),
        ),
        ("Encoder", "train_on", opts.TRAIN_ON, lambda: Encoder(tokenizer, train_on="typo")),
        (
            "encode_messages",
            "train_on",
            opts.TRAIN_ON,
            lambda: encode_messages(tokenizer, messages, train_on="typo"),
        ),
        (
            "encode_messages",
            "train_end_of_turn",
            opts.END_OF_TURN_MODES,
            lambda: encode_messages(tokenizer, messages, train_end_of_turn="typo"),
        ),
        ("choose_loss_path", "loss_impl", opts.LOSS_IMPLS, lambda: choose_loss_path(tiny_llama(), "typo")),
        (
            "causal_lm_loss",
            "reduction",
            opts.REDUCTIONS,
            lambda: causal_lm_loss(logits, labels, reduction="typo"),
        ),
        (
            "fused_linear_cross_entropy",
            "reduction",
            opts.REDUCTIONS,
            lambda: fused_linear_cross_entropy(hidden, weight, labels, reduction="typo"),
        ),
    ]


def test_every_consumer_rejects_a_value_outside_its_vocabulary_with_the_same_message():
    for consumer, name, choices, call in _one_bad_value_each():
        listed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == f"{name} must be {listed}, got 'typo'", consumer


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ShiftLossArguments(output_dir="out", max_length=1), "max_length must be at least 2"),
        (lambda: Encoder(word_tokenizer(), max_length=1), "max_length must be at least 2"),
        (lambda: pack_rows({"input_ids": [[1, 2]], "labels": [[1, 2]]}, 1), "max_length must be at least 2"),
        (
            lambda: ShiftLossArguments(output_dir="out", packing=True, max_length=None),
            "packing needs max_length",
        ),
        (
            lambda: prepare_dataset(Dataset.from_list(_rows()), Encoder(word_tokenizer()), packing=True),
            "packing needs max_length",
        ),
        (lambda: ShiftLossArguments(output_dir="out", z_loss=-1.0), "z_loss must be >= 0"),
        (
            lambda: causal_lm_loss(torch.randn(1, 3, 8), torch.tensor([[1, 2, 3]]), z_loss=-1.0),
            "z_loss must be >= 0",
        ),
        (
            lambda: ShiftLossArguments(output_dir="out", label_smoothing_factor=1.0),
            r"label_smoothing_factor must be in \[0, 1\)",
        ),
        (
            lambda: fused_linear_cross_entropy(
                torch.randn(1, 3, 4), torch.randn(8, 4), torch.tensor([[1, 2, 3]]), label_smoothing=1.0
            ),
            r"label_smoothing must be in \[0, 1\)",
        ),
        (
            lambda: ShiftLossArguments(output_dir="out", fused_chunk_size=0),
            "fused_chunk_size must be a positive number of rows, got 0",
        ),
        (
            lambda: fused_linear_cross_entropy(
                torch.randn(1, 3, 4), torch.randn(8, 4), torch.tensor([[1, 2, 3]]), chunk_size=0
            ),
            "chunk_size must be a positive number of rows, got 0",
        ),
    ],
)
def test_each_range_check_has_one_message_wherever_the_value_is_consumed(call, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        call()
