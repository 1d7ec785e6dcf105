"""Exact normalization with the collators people already have: transformers' own return a BatchEncoding.

transformers' gradient-accumulation loss tests ported onto the trainer: 2 micro-batches x 4 rows per
step, rows with 1 to 21 trained tokens, 3 SGD steps. With each collator, the run must equal the same
batches handed over as plain dicts (bit for bit), and the logged loss and the parameters must match
``transformers.Trainer`` training the same model with its own loss (the model's ``ForCausalLMLoss``,
normalized over the step's items).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import SGD_STEP, tiny_llama, word_tokenizer
from transformers import (
    BatchEncoding,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

VOCAB_SIZE = 64
ROWS = 24
SAME_LENGTH = 22  # DataCollatorWithPadding pads input_ids only: its rows (labels too) have one length


def _rows(same_length: bool, with_labels: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    rows = []
    for index in range(ROWS):
        length = SAME_LENGTH if same_length else 3 + (index * 7) % 20
        input_ids = torch.randint(5, VOCAB_SIZE, (length,), generator=generator).tolist()
        row = {"input_ids": input_ids}
        if with_labels:
            prompt = 1 + (index * 5) % (length - 1)  # 1 to 21 trained targets
            row["labels"] = [-100] * prompt + input_ids[prompt:]
        rows.append(row)
    return rows


COLLATORS = {
    "language_modeling": (lambda tok: DataCollatorForLanguageModeling(tok, mlm=False), False, False),
    "seq2seq": (lambda tok: DataCollatorForSeq2Seq(tok, label_pad_token_id=-100), False, True),
    "with_padding": (lambda tok: DataCollatorWithPadding(tok), True, True),
}

# Plain SGD steps as in test_trainer, two micro-batches of 4 per step, rows in order.
COMMON = dict(SGD_STEP, gradient_accumulation_steps=2, max_steps=3, train_sampling_strategy="sequential")


def _train(trainer_class, args_class, collator, rows, tmp_path, **extra) -> tuple[list[float], torch.Tensor]:
    trainer = trainer_class(
        model=tiny_llama(VOCAB_SIZE),
        args=args_class(output_dir=str(tmp_path), **COMMON, **extra),
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def _as_dict(collator):
    return lambda rows: dict(collator(rows))


@pytest.mark.parametrize("name", sorted(COLLATORS))
def test_a_batch_encoding_is_normalized_like_the_same_batch_as_a_dict_and_like_transformers(
    name, tmp_path, capsys
):
    make, same_length, with_labels = COLLATORS[name]
    collator, rows = make(word_tokenizer()), _rows(same_length, with_labels)
    assert isinstance(collator(rows[:4]), BatchEncoding) and not isinstance(collator(rows[:4]), dict)
    ours = _train(ShiftLossTrainer, ShiftLossArguments, collator, rows, tmp_path / "a", loss_impl="eager")
    summary = capsys.readouterr().out
    assert "counted from the labels of each batch the data_collator returns" in summary
    assert "NOT exact" not in summary
    as_dicts = _train(
        ShiftLossTrainer, ShiftLossArguments, _as_dict(collator), rows, tmp_path / "b", loss_impl="eager"
    )
    assert ours[0] == as_dicts[0]
    assert torch.equal(ours[1], as_dicts[1])
    stock = _train(Trainer, TrainingArguments, collator, rows, tmp_path / "c")
    assert ours[0] == pytest.approx(stock[0], abs=1e-5)  # transformers' own test allows 0.01
    torch.testing.assert_close(ours[1], stock[1], rtol=1e-5, atol=1e-6)


def test_batches_without_labels_are_said_in_the_run_summary_never_claimed_exact(tmp_path, capsys, caplog):
    """Batches the loss can read but the count cannot (not a Mapping): the summary says so at that step."""

    class CountsOnlyFirst:
        def __init__(self):
            self.calls = 0
            self.inner = DataCollatorForSeq2Seq(word_tokenizer(), label_pad_token_id=-100)

        def __call__(self, rows):
            self.calls += 1
            batch = self.inner(rows)
            return _NotAMapping(batch) if self.calls > 2 else batch  # from the second step on

    trainer = ShiftLossTrainer(
        model=tiny_llama(VOCAB_SIZE),
        args=ShiftLossArguments(output_dir=str(tmp_path), **COMMON),
        train_dataset=Dataset.from_list(_rows(False, True)),
        data_collator=CountsOnlyFirst(),
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    printed = capsys.readouterr().out
    assert printed.count("[hf_shift_loss] run summary") == 2
    assert (
        "normalization: NOT exact from step 2, a micro-batch of type _NotAMapping (keys: none: not a mapping)"
        in printed
    )
    assert "normalization is not exact from step 2" in caplog.text
    assert "NOT exact from step 2" in trainer.run_summary()


class _NotAMapping:
    """A batch object that reads like a dict (``in``, ``[]``, ``items``) without being a ``Mapping``."""

    def __init__(self, batch):
        self.data = dict(batch)

    def __contains__(self, key):
        return key in self.data

    def __getitem__(self, key):
        return self.data[key]

    def __len__(self):
        return len(self.data)

    def items(self):
        return self.data.items()
