"""PromptMaskingCollator: the article's 13-token example, truncation, padding, drop/raise, map()."""

import pytest
import torch
from datasets import Dataset
from helpers import word_tokenizer

from hf_shift_loss import PromptMaskingCollator
from hf_shift_loss.loss import shift_labels

PROMPT = "where is the capital of China <sep>"
COMPLETION = "The capital is Beijing"


def test_article_thirteen_token_example():
    tokenizer = word_tokenizer()
    collator = PromptMaskingCollator(tokenizer)
    batch = collator([{"prompt": PROMPT, "completion": COMPLETION}])
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    tokens = tokenizer.convert_ids_to_tokens(input_ids.tolist())
    assert tokens == "<bos> where is the capital of China <sep> The capital is Beijing <eos>".split()
    assert len(tokens) == 13
    assert labels[:8].tolist() == [-100] * 8  # <bos> ... <sep>
    assert labels[8:].tolist() == input_ids[8:].tolist()
    targets = shift_labels(labels)
    trained = targets[targets != -100]
    assert tokenizer.convert_ids_to_tokens(trained.tolist()) == ["The", "capital", "is", "Beijing", "<eos>"]
    # The logits at <sep> (position 7) predict "The"; the logits at "Beijing" predict <eos>.
    assert tokens[7] == "<sep>" and tokenizer.convert_ids_to_tokens([int(targets[7])]) == ["The"]
    assert batch["attention_mask"].tolist() == [[1] * 13]


def test_no_bos_when_tokenizer_does_not_add_one():
    collator = PromptMaskingCollator(word_tokenizer(add_bos=False))
    encoded = collator.encode({"prompt": PROMPT, "completion": COMPLETION})
    assert len(encoded["input_ids"]) == 12
    assert (
        PromptMaskingCollator(word_tokenizer(add_bos=False), add_bos=True).encode(
            {"prompt": PROMPT, "completion": COMPLETION}
        )["input_ids"][0]
        == word_tokenizer().bos_token_id
    )


def test_right_padding_with_pad_id_and_ignored_labels():
    tokenizer = word_tokenizer()
    collator = PromptMaskingCollator(tokenizer, pad_to_multiple_of=8)
    batch = collator(
        [
            {"prompt": PROMPT, "completion": COMPLETION},
            {"prompt": "who wrote this book <sep>", "completion": "I do not know"},
        ]
    )
    assert batch["input_ids"].shape == (2, 16)
    short_length = 1 + 5 + 4 + 1
    assert batch["attention_mask"][1].tolist() == [1] * short_length + [0] * (16 - short_length)
    assert torch.all(batch["input_ids"][1, short_length:] == tokenizer.pad_token_id)
    assert torch.all(batch["labels"][1, short_length:] == -100)
    assert batch["labels"][1, short_length - 1] == tokenizer.eos_token_id


def test_pad_falls_back_to_eos_and_says_so(caplog):
    tokenizer = word_tokenizer()
    tokenizer.pad_token = None
    with caplog.at_level("INFO"):
        collator = PromptMaskingCollator(tokenizer)
    assert "no pad token" in caplog.text
    batch = collator([{"prompt": "a", "completion": "yes"}, {"prompt": PROMPT, "completion": COMPLETION}])
    assert batch["input_ids"][0, -1] == tokenizer.eos_token_id
    assert batch["labels"][0, -1] == -100  # padding, not the trained eos
    assert batch["labels"][0, 3] == tokenizer.eos_token_id  # <bos> a yes <eos>: the trained eos


def test_max_length_truncates_prompt_from_the_left_first():
    tokenizer = word_tokenizer()
    collator = PromptMaskingCollator(tokenizer, max_length=9)
    encoded = collator.encode({"prompt": PROMPT, "completion": COMPLETION})
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["<bos>", "of", "China", "<sep>", "The", "capital", "is", "Beijing", "<eos>"]
    assert encoded["truncated_tokens"] == 4
    assert encoded["truncated_completion"] == 0


def test_max_length_cuts_completion_only_when_prompt_is_gone_and_counts_it():
    tokenizer = word_tokenizer()
    collator = PromptMaskingCollator(tokenizer, max_length=4)
    batch = collator([{"prompt": PROMPT, "completion": COMPLETION}])
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == ["<bos>", "The", "capital", "is"]
    assert collator.stats.truncated_tokens == 9
    assert collator.stats.truncated_completions == 1
    assert collator.stats.truncated_examples == 1


def test_untrained_example_dropped_with_count_or_raised(caplog):
    tokenizer = word_tokenizer()
    # max_length=2 leaves <bos> and one completion token: one target. max_length 2 with a 1-token
    # completion + eos: trained. An empty-after-truncation answer needs labels only on position 0.
    examples = [
        {"input_ids": [1, 5, 6, 7], "labels": [1, -100, -100, -100]},  # only position 0: never a target
        {"prompt": PROMPT, "completion": COMPLETION},
    ]
    collator = PromptMaskingCollator(tokenizer)
    with caplog.at_level("WARNING"):
        batch = collator(examples)
    assert "example 0 of this batch (4 tokens) has no trained token: dropped" in caplog.text
    assert batch["input_ids"].shape[0] == 1
    assert collator.stats.untrained_examples == 1 and collator.stats.kept_examples == 1
    strict = PromptMaskingCollator(tokenizer, on_untrained="raise")
    with pytest.raises(ValueError, match="example 0 of this batch .* no trained token"):
        strict(examples)


def test_all_untrained_batch_is_kept_all_masked_so_loss_is_zero():
    collator = PromptMaskingCollator(word_tokenizer())
    batch = collator([{"input_ids": [1, 5, 6], "labels": [-100, -100, -100]}])
    assert torch.all(batch["labels"] == -100)
    assert collator.stats.untrained_examples == 1


def test_train_on_all_trains_every_token():
    collator = PromptMaskingCollator(word_tokenizer(), train_on="all")
    encoded = collator.encode({"prompt": PROMPT, "completion": COMPLETION})
    assert encoded["labels"] == encoded["input_ids"]


def test_pretokenized_examples_and_label_length_check():
    collator = PromptMaskingCollator(word_tokenizer())
    batch = collator([{"input_ids": [1, 5, 6, 2]}, {"input_ids": [1, 5], "labels": [-100, 5]}])
    assert batch["labels"].tolist() == [[1, 5, 6, 2], [-100, 5, -100, -100]]
    with pytest.raises(ValueError, match="'labels' has 1 entries but 'input_ids' has 2"):
        collator.encode({"input_ids": [1, 5], "labels": [5]}, index=3)


def test_bad_examples_name_the_example():
    collator = PromptMaskingCollator(word_tokenizer())
    with pytest.raises(ValueError, match=r"row 7: fits no format \(keys and types: \{'txt': 'str'\}\)"):
        collator.encode({"txt": "hello"}, 7)
    with pytest.raises(ValueError, match="row 2: 'prompt' and 'completion' must be two strings or two lists"):
        collator.encode({"prompt": 3, "completion": "x"}, 2)
    with pytest.raises(ValueError, match="row 1: empty completion"):
        collator.encode({"prompt": "a", "completion": ""}, 1)
    with pytest.raises(ValueError, match="max_length"):
        PromptMaskingCollator(word_tokenizer(), max_length=1)


def test_encode_works_with_datasets_map_num_proc():
    tokenizer = word_tokenizer()
    collator = PromptMaskingCollator(tokenizer, max_length=9)
    rows = [{"prompt": PROMPT, "completion": COMPLETION}, {"prompt": "who <sep>", "completion": "no"}] * 4
    dataset = Dataset.from_list(rows).map(collator.encode, with_indices=True, num_proc=2)
    assert dataset[0]["truncated_tokens"] == 4
    direct = collator([dict(row) for row in rows[:2]])
    mapped = collator([dataset[0], dataset[1]])
    assert torch.equal(direct["input_ids"], mapped["input_ids"])
    assert torch.equal(direct["labels"], mapped["labels"])
    # The counts computed inside the worker processes reach the collator's stats.
    assert collator.stats.truncated_tokens == 8
