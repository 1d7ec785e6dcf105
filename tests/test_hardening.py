"""Bad input gets a clear outcome: a counted drop, a NaN with a warning, or a ValueError naming the row."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset
from helpers import tiny_llama, word_tokenizer

from hf_shift_loss import PromptMaskingCollator, ShiftLossArguments, ShiftLossTrainer, prepare_dataset
from hf_shift_loss.data import Encoder


def _args(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, max_steps=1)
    return ShiftLossArguments(**(options | overrides))


def test_eval_set_without_a_trained_token_reports_nan_and_says_so(tmp_path, caplog):
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, -100, -100]}] * 3
    trainer = ShiftLossTrainer(
        model=tiny_llama(),
        args=_args(tmp_path, on_untrained="drop"),
        eval_dataset={"quiet": Dataset.from_list(rows[:1] + [{"input_ids": [1, 5], "labels": [-100, 5]}])},
        processing_class=word_tokenizer(),
    )
    # Preparation dropped the untrainable row; evaluate a set whose only row trains nothing:
    trainer.eval_dataset["quiet"] = trainer.eval_dataset["quiet"].map(lambda row: {"labels": [-100, -100]})
    with caplog.at_level("WARNING"):
        metrics = trainer.evaluate()
    assert math.isnan(metrics["eval_quiet_loss"]) and metrics["eval_quiet_trained_tokens"] == 0
    assert "eval_quiet: the evaluation set has no trained token" in caplog.text


def test_a_tokenizer_without_pad_and_eos_fails_at_construction_with_the_fix(tmp_path):
    tokenizer = word_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token.*tokenizer.pad_token ="):
        ShiftLossTrainer(
            model=tiny_llama(),
            args=_args(tmp_path),
            train_dataset=Dataset.from_list([{"text": "a b"}]),
            processing_class=tokenizer,
        )


def test_empty_rows_are_dropped_and_counted():
    rows = [{"input_ids": [], "labels": []}, {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}]
    prepared = prepare_dataset(Dataset.from_list(rows), Encoder(word_tokenizer()))
    assert prepared.stats.untrained_examples == 1 and len(prepared.dataset) == 1
    with pytest.raises(ValueError, match="train set, row 0: no trained token"):
        prepare_dataset(Dataset.from_list(rows), Encoder(word_tokenizer()), on_untrained="raise")
    collator = PromptMaskingCollator(word_tokenizer())
    with pytest.raises(ValueError, match="all 1 examples of this batch are empty"):
        collator(rows[:1])


def test_an_input_id_beyond_the_embedding_is_reported_once_at_preparation(tmp_path):
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 5, 70, 6], "labels": None}]
    with pytest.raises(ValueError, match=r"train set, row 1, position 2: input id 70 is outside .* 64 rows"):
        ShiftLossTrainer(
            model=tiny_llama(vocab_size=64),
            args=_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=word_tokenizer(),
        )
    with pytest.raises(ValueError, match=r"row 0, column 'input_ids', position 1: input id -3 is negative"):
        prepare_dataset(Dataset.from_list([{"input_ids": [1, -3]}]), Encoder(word_tokenizer()), vocab_size=64)
    streamed = prepare_dataset(
        Dataset.from_list(rows).to_iterable_dataset(), Encoder(word_tokenizer()), vocab_size=64
    )
    with pytest.raises(ValueError, match="row 1, position 2: input id 70"):
        list(streamed.dataset)


def test_compute_metrics_is_called_or_its_absence_explained(tmp_path, caplog):
    rows = [{"prompt": "where is the capital of China", "completion": "Beijing"}] * 3
    calls = []

    def compute_metrics(prediction):
        calls.append(prediction.predictions.shape)
        return {"seen": 1.0}

    common = dict(model=tiny_llama(), eval_dataset=Dataset.from_list(rows), processing_class=word_tokenizer())
    with caplog.at_level("WARNING"):
        quiet = ShiftLossTrainer(args=_args(tmp_path / "a"), compute_metrics=compute_metrics, **common)
    assert "compute_metrics will not be called: prediction_loss_only=True" in caplog.text
    assert "eval_seen" not in quiet.evaluate()
    loud = ShiftLossTrainer(
        args=_args(tmp_path / "b", prediction_loss_only=False, loss_impl="fused"),
        compute_metrics=compute_metrics,
        **common,
    )
    metrics = loud.evaluate()
    assert metrics["eval_seen"] == 1.0 and calls and calls[0][-1] == 64  # logits [rows, seq, vocab]
    assert metrics["eval_loss"] == pytest.approx(quiet.evaluate()["eval_loss"], rel=1e-5)


def test_the_run_explains_itself_in_one_block(tmp_path, capsys):
    rows = [{"prompt": "where is the capital of China", "completion": "Beijing"}] * 4
    trainer = ShiftLossTrainer(
        model=tiny_llama(),
        args=_args(tmp_path, loss_impl="auto", packing=True, max_length=32, gradient_accumulation_steps=2),
        train_dataset=Dataset.from_list(rows),
        processing_class=word_tokenizer(),
    )
    trainer.train()
    printed = capsys.readouterr().out
    block = printed[printed.index("[hf_shift_loss] run summary") :].splitlines()[:6]
    assert block[1].startswith("  loss: fused lm_head + cross-entropy")
    assert block[2].startswith("  trained: the completion / every assistant turn; end-of-turn tokens: turn")
    assert block[3] == "  packing: on, rows of 32 tokens; batches: rows padded to the longest"
    assert "(2 micro-batch(es) x 1 rank(s))" in block[4]
    assert (
        block[5].startswith("  train set (prompt_completion): 4 of 4 examples kept")
        and "packed into 2 rows, 56.2% full" in block[5]
    )
    assert printed.count("[hf_shift_loss] run summary") == 1


def test_whitespace_only_completions_are_counted_and_said_once(caplog):
    rows = [
        {"prompt": "a", "completion": "   "},
        {"prompt": "a", "completion": "yes"},
        {"prompt": "b", "completion": "\n"},
    ]
    with caplog.at_level("WARNING"):
        prepared = prepare_dataset(Dataset.from_list(rows), Encoder(word_tokenizer()))
    assert prepared.stats.blank_completions == 2 and prepared.stats.kept_examples == 3  # EOS is still trained
    assert caplog.text.count("completion of only whitespace (rows 0, 2)") == 1


def test_a_chat_answer_cut_from_the_right_is_counted():
    from chat_tokenizers import smollm2_tokenizer

    messages = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "word " * 60}]
    prepared = prepare_dataset(
        Dataset.from_list([{"messages": messages}]), Encoder(smollm2_tokenizer(), max_length=48)
    )
    stats = prepared.stats
    assert stats.truncated_completions == 1 and stats.truncated_examples == 1 and stats.truncated_tokens > 0


def test_a_changed_encoder_never_reads_a_stale_datasets_cache(tmp_path, monkeypatch):
    """datasets caches map() by a fingerprint that names the Encoder class but not its code."""
    import json

    from hf_shift_loss.data import prepare as prepare_module
    from hf_shift_loss.data.load import load_data

    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": "where is the capital", "completion": "Beijing"}) for _ in range(4))
    )
    dataset = load_data(str(path))  # file-backed: map() results are cached on disk
    first = prepare_dataset(dataset, Encoder(word_tokenizer(), max_length=8)).dataset
    again = prepare_dataset(dataset, Encoder(word_tokenizer(), max_length=8)).dataset
    assert again._fingerprint == first._fingerprint and first.cache_files  # the cache is used...
    monkeypatch.setattr(prepare_module, "_code_version", lambda: "another version of the encoder's code")
    changed = prepare_dataset(dataset, Encoder(word_tokenizer(), max_length=8)).dataset
    assert changed._fingerprint != first._fingerprint  # ...but not across a code change
