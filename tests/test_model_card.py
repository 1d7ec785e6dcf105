"""save_model / push_to_hub write a model card: TRL's fields plus the run summary, with no network."""

from __future__ import annotations

import os

from datasets import Dataset
from helpers import tiny_llama, word_tokenizer
from huggingface_hub import ModelCard

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

ROWS = [{"prompt": "the cat", "completion": " sat on the mat"}] * 4


def trainer(tmp_path, **overrides):
    model = tiny_llama()
    model.config._name_or_path = "org/tiny-base"  # as loaded from the hub
    args = ShiftLossArguments(
        output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no", **overrides
    )
    return ShiftLossTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=word_tokenizer()
    )


def test_save_model_writes_the_card_with_tags_and_what_was_trained(tmp_path):
    run = trainer(tmp_path / "out")
    run.train()
    run.save_model(str(tmp_path / "saved"))
    card = ModelCard.load(os.path.join(tmp_path / "saved", "README.md"))
    assert card.data.base_model == "org/tiny-base" and card.data.model_name == "saved"
    assert {"generated_from_trainer", "hf_shift_loss", "sft"} <= set(card.data.tags)
    assert "trained from scratch" not in card.text and "None dataset" not in card.text
    assert "fine-tuned version of [org/tiny-base](https://huggingface.co/org/tiny-base)" in card.text
    assert run.run_summary() in card.text  # loss path, what was trained, the data counts
    assert "train set (prompt_completion): 4 of 4 examples kept" in card.text
    assert set(run.model.model_tags) >= {"hf_shift_loss", "sft"}  # what push_to_hub adds to the card


def test_create_model_card_as_push_to_hub_calls_it(tmp_path):
    run = trainer(tmp_path, hub_model_id="me/tiny-sft")
    run.create_model_card(model_name="tiny-sft", dataset_name="org/rows", tags=["math"], license="apache-2.0")
    card = ModelCard.load(os.path.join(tmp_path, "README.md"))
    assert (card.data.model_name, card.data.datasets, card.data.license) == (
        "tiny-sft",
        "org/rows",
        "apache-2.0",
    )
    assert {"math", "hf_shift_loss", "sft"} <= set(card.data.tags)
    assert (
        'model="me/tiny-sft"' in card.text
        and "on the [org/rows](https://huggingface.co/datasets/org/rows)" in card.text
    )
