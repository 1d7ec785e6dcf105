"""Special-token strings inside content: counted per dataset, and kept as text with split_special_tokens."""

from __future__ import annotations

import pytest
from chat_tokenizers import smollm2_tokenizer
from datasets import Dataset

from hf_shift_loss.data import Encoder, prepare_dataset

TEXT = "Chat logs start each turn with <|im_start|> and a role."


def test_by_default_a_special_token_string_in_content_is_the_control_token_and_is_counted():
    tokenizer = smollm2_tokenizer()
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    encoded = Encoder(tokenizer)({"text": TEXT})
    assert im_start in encoded["labels"]  # trained as a control token: what the count warns about
    assert encoded["special_tokens_in_content"] == 1
    assert Encoder(tokenizer)({"text": "plain words"})["special_tokens_in_content"] == 0


@pytest.mark.parametrize("row", [{"text": TEXT}, {"prompt": "Quote the log: ", "completion": TEXT}])
def test_split_special_tokens_keeps_them_as_text_and_eos_special(row):
    tokenizer = smollm2_tokenizer()
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    encoded = Encoder(tokenizer, split_special_tokens=True)(row)
    assert im_start not in encoded["input_ids"]
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id  # the EOS the encoder appends stays special
    assert tokenizer.decode(encoded["input_ids"][:-1]).endswith(TEXT)
    assert encoded["special_tokens_in_content"] == 1


def test_chat_rows_are_counted_and_refused_with_split_special_tokens():
    tokenizer = smollm2_tokenizer()
    row = {"messages": [{"role": "user", "content": TEXT}, {"role": "assistant", "content": "Yes."}]}
    assert Encoder(tokenizer)(row)["special_tokens_in_content"] == 1
    with pytest.raises(ValueError, match="row 4: a message's content holds a special-token string"):
        Encoder(tokenizer, split_special_tokens=True)(row, 4)


def test_counted_per_dataset():
    rows = [{"text": TEXT}, {"text": "plain"}, {"text": "<|endoftext|> twice <|im_end|>"}]
    stats = prepare_dataset(Dataset.from_list(rows), Encoder(smollm2_tokenizer())).stats
    assert stats.special_tokens_in_content == 2
    assert stats.log_entries()["data/special_tokens_in_content"] == 2.0


def test_the_batched_encoder_splits_them_too():
    encoder = Encoder(smollm2_tokenizer(), split_special_tokens=True)
    rows = [{"text": TEXT}, {"text": "plain"}]
    batch = encoder.encode_batch({"text": [row["text"] for row in rows]}, [0, 1])
    assert batch["input_ids"] == [encoder(row)["input_ids"] for row in rows]
