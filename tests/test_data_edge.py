"""The data edge: every bad value is refused once, at preparation, naming the set, row, column and position."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset, IterableDataset
from helpers import tiny_llama, word_tokenizer

from hf_shift_loss import PromptMaskingCollator, ShiftLossArguments, ShiftLossTrainer, prepare_dataset
from hf_shift_loss.data import Encoder
from hf_shift_loss.data import validate as validate_module


def _prepare(rows, **options):
    return prepare_dataset(Dataset.from_list(rows), Encoder(word_tokenizer()), **options)


GOOD = {"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}

BAD_VALUES = [
    # (column, bad row value, message after "row 1, column '<column>', position <p>: ")
    (
        "labels",
        [-100, -1, 6, 7],
        r"position 1: label -1 is negative; only -100 marks a position as not trained",
    ),
    ("labels", [-100, 5.0, math.nan, 7.0], r"position 2: nan is not a whole number"),
    ("labels", [-100, math.inf, 6.0, 7.0], r"position 1: inf is not a whole number"),
    ("labels", [-100, 5.7, 6.0, 7.0], r"position 1: 5.7 is not a whole number"),
    ("input_ids", [True, False, True, True], r"position 0: True is a bool, not a token id"),
    ("input_ids", ["1", "5", "6", "7"], r"position 0: '1' is a string, not a token id"),
    ("input_ids", [[1, 5], [6, 7], [8], [9]], r"position 0: a nested list, not a token id"),
    ("input_ids", [1, -5, 6, 7], r"position 1: input id -5 is negative"),
]


@pytest.mark.parametrize(("column", "value", "message"), BAD_VALUES)
def test_a_bad_pre_tokenized_value_is_refused_naming_row_column_and_position(column, value, message):
    bad = dict(GOOD, **{column: value}) if column == "labels" else {"input_ids": value}
    numeric = all(isinstance(item, int | float) and not isinstance(item, bool) for item in value)
    # An arrow column has one type: a non-numeric value is alone in its dataset (row 0).
    rows, row = ([{key: GOOD[key] for key in bad}, bad], 1) if numeric else ([bad], 0)
    with pytest.raises(ValueError, match=rf"row {row}, column '{column}', {message}"):
        _prepare(rows)
    with pytest.raises(ValueError, match=rf"row, column '{column}', {message}"):  # the collator: same rule
        PromptMaskingCollator(word_tokenizer())([bad])


def test_integral_floats_are_token_ids():
    prepared = _prepare([{"input_ids": [1.0, 5.0, 6.0], "labels": [-100.0, 5.0, 6.0]}])
    assert prepared.dataset[0]["input_ids"] == [1, 5, 6] and prepared.dataset[0]["labels"] == [-100, 5, 6]


def test_the_vocabulary_check_is_vectorized_and_names_the_row_across_batches(monkeypatch):
    monkeypatch.setattr(validate_module, "CHECK_BATCH_ROWS", 2)  # rows 0-1, 2-3, 4: batch offsets count
    rows = [GOOD] * 4 + [{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 64, 7]}]
    with pytest.raises(ValueError, match=r"train set, row 4, position 2: label 64 is outside .* of 64 rows"):
        _prepare(rows, vocab_size=64)
    assert len(_prepare(rows, vocab_size=65).dataset) == 5


def _trainer(tmp_path, **datasets):
    return ShiftLossTrainer(
        model=tiny_llama(),
        args=ShiftLossArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1),
        processing_class=word_tokenizer(),
        **datasets,
    )


def test_an_empty_dataset_is_refused_at_construction_naming_the_set(tmp_path):
    with pytest.raises(
        ValueError, match=r"the train set is empty \(0 rows\), so there is nothing to train on"
    ):
        _trainer(tmp_path, train_dataset=Dataset.from_list([]))
    with pytest.raises(
        ValueError, match=r"the eval set is empty \(0 rows\), so there is nothing to evaluate"
    ):
        _trainer(
            tmp_path, train_dataset=Dataset.from_list([{"text": "a b"}]), eval_dataset=Dataset.from_list([])
        )
    empty_stream = IterableDataset.from_generator(lambda: iter(()))
    with pytest.raises(ValueError, match=r"the train set is empty"):
        prepare_dataset(empty_stream, Encoder(word_tokenizer()))


def test_a_dataset_with_no_trainable_row_left_is_refused_at_construction(tmp_path):
    rows = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}] * 3  # trained only past max_length
    with pytest.raises(
        ValueError,
        match=r"the train set has no row left to train: all 3 rows were dropped because none has a trained "
        r"token after masking and truncation \(3 of them were truncated to max_length=2;",
    ):
        prepare_dataset(Dataset.from_list(rows), Encoder(word_tokenizer(), max_length=2))
    masked = [{"input_ids": [1, 5, 6], "labels": [-100, -100, -100]}] * 2
    with pytest.raises(ValueError, match=r"the eval set has no row left to train: all 2 rows were dropped"):
        _trainer(tmp_path, eval_dataset=Dataset.from_list(masked))


def test_mixed_formats_in_one_dataset_are_refused_naming_rows_and_formats():
    rows = [
        {"text": "a b"},
        {"prompt": "a", "completion": "b"},
        {"text": "c d"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    keys = ("text", "prompt", "completion", "messages")  # as a JSON lines file loads: absent keys are None
    rows = [{key: row.get(key) for key in keys} for row in rows]
    with pytest.raises(
        ValueError,
        match=r"the train set mixes formats, 'messages': 1 rows \(3\); 'prompt_completion': 1 rows \(1\); "
        r"'text': 2 rows \(0, 2\); one dataset holds one format",
    ):
        _prepare(rows)
    same = [
        {"text": "a b", "prompt": None, "completion": None},
        {"text": "c d", "prompt": "x", "completion": None},
    ]
    assert _prepare(same).format == "text"  # rows whose other columns are (partly) null: one format
