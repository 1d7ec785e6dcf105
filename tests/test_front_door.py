"""The front door a TRL user expects: model by name, ShiftLossArguments, any dataset format, peft_config.

Every format trains through the same short script; what was truncated or dropped is logged exactly,
whatever the data-loader workers.
"""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch
from chat_tokenizers import smollm2_tokenizer
from datasets import Dataset, load_dataset
from helpers import tiny_llama, word_tokenizer
from peft import LoraConfig, PeftModel
from transformers import TrainingArguments

from hf_shift_loss import DataStats, ShiftLossArguments, ShiftLossTrainer
from hf_shift_loss.data import Batcher, Encoder, prepare_dataset

QA = [
    ("What is the capital of France?", "Paris."),
    ("Name a prime number.", "Seven is prime."),
    ("Say hello.", "Hello! Nice to meet you."),
    ("What is 2 + 2?", "2 + 2 = 4."),
]
FORMATS = {
    "text": [{"text": f"Q: {q} A: {a}"} for q, a in QA],
    "prompt_completion": [{"prompt": q, "completion": " " + a} for q, a in QA],
    "conversational": [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in QA
    ],
    "messages": [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA
    ],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with the real SmolLM2 tokenizer (ChatML template), saved like a hub checkpoint."""
    folder = str(tmp_path_factory.mktemp("tiny-smollm2"))
    tokenizer = smollm2_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _jsonl(tmp_path, rows: list[dict]) -> str:
    path = os.path.join(str(tmp_path), "train.jsonl")
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def _tokenized_rows() -> list[dict]:
    """Pre-tokenized rows: the prompt masked with -100, the answer and EOS trained."""
    tokenizer = smollm2_tokenizer()
    rows = []
    for question, answer in QA:
        prompt = tokenizer(question, add_special_tokens=False)["input_ids"]
        completion = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return rows


@pytest.mark.parametrize("data_format", [*sorted(FORMATS), "tokenized"])
def test_a_trl_style_script_trains_on_every_format(tmp_path, model_dir, data_format):
    data_file = _jsonl(tmp_path, _tokenized_rows() if data_format == "tokenized" else FORMATS[data_format])
    # ---- the user's script (what a TRL user writes), 9 lines
    dataset = load_dataset("json", data_files=data_file, split="train")
    trainer = ShiftLossTrainer(
        model=model_dir,
        args=ShiftLossArguments(
            output_dir=str(tmp_path / "out"),
            max_length=64,
            max_steps=2,
            per_device_train_batch_size=2,
            report_to="none",
        ),
        train_dataset=dataset,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    # ----
    assert isinstance(trainer.model, PeftModel)
    stats = trainer.data_stats["train"]
    assert stats.kept_examples == 4 and stats.untrained_examples == 0 and stats.trained_tokens > 0
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    with open(tmp_path / "out" / "data_summary.json", encoding="utf-8") as file:
        assert json.load(file)["train"]["trained_tokens"] == stats.trained_tokens
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    trained = tokenizer.decode([label for label in row["labels"] if label != -100])
    question, answer = QA[0]
    if data_format == "text":
        assert trained.startswith("Q: " + question)  # language modelling: every token
    else:
        assert answer in trained and question not in trained  # only the answer (+ its end of turn)
        assert trained.rstrip().endswith(tokenizer.eos_token)


def test_a_row_that_fits_no_format_is_named(tmp_path):
    tokenizer = word_tokenizer()
    args = ShiftLossArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\] fit no known format"):
        ShiftLossTrainer(
            model=tiny_llama(),
            args=args,
            train_dataset=Dataset.from_list([{"question": "a", "answer": "b"}]),
            processing_class=tokenizer,
        )
    rows = Dataset.from_list([{"prompt": "a", "completion": "yes"}, {"prompt": "a", "completion": None}])
    with pytest.raises(
        ValueError, match=r"row 1: fits no format \(keys and types: .*'completion': 'NoneType'"
    ):
        prepare_dataset(rows, Encoder(tokenizer))
    with pytest.raises(ValueError, match="row 5: 'prompt' and 'completion' must be two strings or two lists"):
        Encoder(tokenizer)({"prompt": "a", "completion": 3}, 5)


def test_plain_training_arguments_are_converted_once(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, report_to="none")
    trainer = ShiftLossTrainer(model=tiny_llama(), args=plain)
    assert isinstance(trainer.args, ShiftLossArguments)
    assert trainer.args.learning_rate == 3e-4
    # TrainingArguments' remove_unused_columns=True default does not come back: no column trap.
    assert trainer.args.remove_unused_columns is False and trainer.args.max_length == 1024


def test_dataset_dict_iterable_and_a_dict_of_eval_sets(tmp_path):
    tokenizer = word_tokenizer()
    rows = [{"prompt": "where is the capital of China", "completion": "Beijing"}] * 6
    splits = datasets.DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])})
    args = ShiftLossArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True
    )
    trainer = ShiftLossTrainer(
        model=tiny_llama(), args=args, train_dataset=splits, eval_dataset=splits, processing_class=tokenizer
    )
    assert set(trainer.eval_dataset) == {"train", "test"} and trainer.data_stats["eval:test"].examples == 2
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_test_trained_tokens"] == 2 * 2  # "Beijing <eos>" per row
    streamed = ShiftLossTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_list(rows).to_iterable_dataset(),
        processing_class=tokenizer,
    )
    assert streamed.data_stats["train"] is None  # counted as rows are read
    streamed.train()
    assert streamed.state.global_step == 2


def test_a_given_data_collator_wins(tmp_path):
    calls = []

    def collator(rows):
        calls.append(len(rows))
        return Batcher(pad_token_id=0)([{"input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]} for _ in rows])

    args = ShiftLossArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none"
    )
    trainer = ShiftLossTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_list([{"raw": "x"}] * 2),
        data_collator=collator,
    )
    assert trainer.train_dataset.column_names == ["raw"]  # not prepared: the user's collator batches it
    trainer.train()
    assert calls == [2]


# One format per dataset (mixed formats are refused): pre-tokenized rows, each trained at its start and
# untrained in the tail that max_length=8 cuts (so no answer is cut), and one with nothing trained.
ROWS_WITH_CUTS = [
    {
        "input_ids": [1, 5, 6, 7, 8, 9, 10, 11, 8, 6, 12, 2],
        "labels": [-100, 5, 6, 7, 8, 9, 10, 11] + [-100] * 4,
    },
    {
        "input_ids": [1, 24, 25, 26, 27, 32, 33, 34, 35, 2],
        "labels": [-100, 24, 25, 26, 27, 32, 33, 34, -100, -100],
    },
    {"input_ids": [1, 16, 36, 2], "labels": [-100, 16, 36, 2]},  # 4: kept whole
    {"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, -100, -100, -100]},  # no trained token: dropped
] * 3


def _counts_logged(tmp_path, rows, workers: int, max_length: int) -> tuple[dict, DataStats]:
    tokenizer = word_tokenizer()
    args = ShiftLossArguments(
        output_dir=str(tmp_path / f"w{workers}-{max_length}"),
        max_length=max_length,
        max_steps=3,
        per_device_train_batch_size=2,
        dataloader_num_workers=workers,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = ShiftLossTrainer(
        model=tiny_llama(), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "data/truncated_tokens" in entry)
    return logged, trainer.data_stats["train"]


@pytest.mark.parametrize("workers", [0, 2])
def test_logged_truncation_and_drop_counts_are_exact_with_workers(tmp_path, workers):
    logged, stats = _counts_logged(tmp_path, ROWS_WITH_CUTS, workers, max_length=8)
    assert logged["data/truncated_tokens"] == stats.truncated_tokens == 3 * (4 + 2)
    assert logged["data/truncated_examples"] == 6 and logged["data/truncated_completions"] == 0
    assert logged["data/untrained_examples"] == stats.untrained_examples == 3
    assert logged["data/kept_examples"] == 9
    nothing_cut, _ = _counts_logged(tmp_path, ROWS_WITH_CUTS[:3], workers, max_length=32)
    assert nothing_cut["data/truncated_tokens"] == 0 and nothing_cut["data/untrained_examples"] == 0


def test_an_sft_config_is_converted_field_by_field_and_nothing_is_dropped(tmp_path):
    trl = pytest.importorskip("trl")
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_length=96,
        packing=True,
        padding_free=True,
        dataset_num_proc=2,
        packing_strategy="bfd_split",
        completion_only_loss=False,
        bf16=False,
    )
    args = ShiftLossArguments.from_training_arguments(config)
    assert (args.max_length, args.packing, args.padding_free, args.num_proc) == (96, True, True, 2)
    assert args.learning_rate == config.learning_rate and args.remove_unused_columns is False
    assert (args.packing_overflow, args.truncation_mode, args.pad_to_multiple_of) == (
        "split",
        "keep_start",
        None,
    )
    # TRL's switches, read per format as TRL reads them (an SFTConfig always sets assistant_only_loss).
    assert [args.train_on_for(f) for f in ("prompt_completion", "messages", "text")] == ["all", "all", "all"]
    default = ShiftLossArguments.from_training_arguments(trl.SFTConfig(output_dir=str(tmp_path), bf16=False))
    assert [default.train_on_for(f) for f in ("prompt_completion", "messages", "text", "tokenized")] == [
        "completion",
        "all",
        "all",
        "completion",
    ]
