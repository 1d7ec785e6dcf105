"""Padding-free packing: bin packing, boundary masking, and block-diagonal attention for real."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import tiny_llama, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_shift_loss.collator import PromptMaskingCollator
from hf_shift_loss.loss import causal_lm_loss
from hf_shift_loss.packing import (
    PackingStats,
    check_packing_support,
    collate_packed,
    pack_examples,
)
from hf_shift_loss.trainer import ShiftLossArguments, ShiftLossTrainer


def _examples(lengths: list[int], prompt_length: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        input_ids = torch.randint(3, 64, (length,), generator=generator).tolist()
        labels = [-100] * min(prompt_length, length) + input_ids[prompt_length:]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def _targets(labels: list[int]) -> int:
    return sum(1 for label in labels[1:] if label != -100)


# ---------------------------------------------------------------------- packing


def test_best_fit_decreasing_puts_each_sequence_into_the_fullest_row_that_fits():
    packed = pack_examples(_examples([3, 6, 2, 5, 4]), max_length=10)
    # 6 -> new row (room 4); 5 -> new row (room 5); 4 -> fullest fitting row: the 6 (room 4, not 5);
    # 3 -> the 5 (room 2); 2 -> the 5 again (room 0).
    assert [row.sequence_lengths for row in packed] == [[6, 4], [5, 3, 2]]
    assert packed.stats.rows == 2 and packed.stats.fill == 1.0


def test_first_label_of_every_packed_sequence_is_masked():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    packed = pack_examples(examples, max_length=8)
    assert packed[0].input_ids == [5, 6, 7, 8, 9]
    # Without the mask on 8, the token 7 (end of the first sequence) would be trained to predict 8.
    assert packed[0].labels == [-100, 6, 7, -100, 9]
    assert packed[0].position_ids == [0, 1, 2, 0, 1]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    max_length=st.integers(8, 48),
    overflow=st.sampled_from(["truncate", "split"]),
)
def test_packing_keeps_every_token_and_every_target(lengths, max_length, overflow):
    examples = _examples(lengths)
    packed = pack_examples(examples, max_length, overflow=overflow)
    stats = packed.stats
    assert all(len(row) <= max_length for row in packed)
    assert stats.rows == len(packed) and stats.tokens == sum(len(row) for row in packed)
    # Best-fit decreasing never leaves two rows that could have been merged.
    sizes = sorted(len(row) for row in packed)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > max_length
    placed_tokens = Counter(token for row in packed for token in row.input_ids)
    kept_tokens = Counter(
        token
        for example in examples
        for token in example["input_ids"][: max_length if overflow == "truncate" else None]
    )
    assert placed_tokens == kept_tokens
    # Trained targets: packing changes none, except at split points (counted) and truncated tails.
    original = sum(
        _targets(example["labels"][: max_length if overflow == "truncate" else None]) for example in examples
    )
    packed_targets = sum(_targets([-100, *row.labels]) for row in packed)
    assert packed_targets == original - stats.lost_boundary_targets
    if overflow == "truncate":
        assert stats.truncated_tokens == sum(max(0, length - max_length) for length in lengths)
        assert stats.split_examples == 0
    else:
        assert stats.truncated_tokens == 0
        assert stats.split_pieces == sum(
            -(-length // max_length) for length in lengths if length > max_length
        )


def test_overflow_truncate_and_split_are_counted():
    examples = _examples([25, 4], prompt_length=0)
    truncated = pack_examples(examples, max_length=10, overflow="truncate")
    assert truncated.stats.truncated_examples == 1 and truncated.stats.truncated_tokens == 15
    assert sorted(len(row) for row in truncated) == [4, 10]

    split = pack_examples(examples, max_length=10, overflow="split")
    assert split.stats.split_examples == 1 and split.stats.split_pieces == 3
    assert split.stats.lost_boundary_targets == 2  # pieces 2 and 3 cannot see their predecessor
    assert sorted(length for row in split for length in row.sequence_lengths) == [4, 5, 10, 10]
    assert split.stats.truncated_tokens == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_length"):
        pack_examples(_examples([3]), max_length=1)
    with pytest.raises(ValueError, match="overflow"):
        pack_examples(_examples([3]), max_length=8, overflow="drop")
    with pytest.raises(ValueError, match="labels"):
        pack_examples([{"input_ids": [1, 2], "labels": [1]}], max_length=8)
    with pytest.raises(ValueError, match="layout"):
        collate_packed(pack_examples(_examples([3]), 8), pad_token_id=0, layout="columns")


def test_stats_cumulate_over_calls():
    stats = PackingStats()
    pack_examples(_examples([3, 4]), 8, stats=stats)
    pack_examples(_examples([5]), 8, stats=stats)
    assert stats.examples == 3 and stats.tokens == 12 and stats.rows == 2 and stats.capacity == 16


# ---------------------------------------------------------------------- collate


def test_collate_rows_layout_pads_with_a_block_of_its_own():
    packed = pack_examples(_examples([6, 3, 2]), max_length=8)
    batch = collate_packed(packed, pad_token_id=0, pad_to_multiple_of=4)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].shape == (2, 8)
    rows = [row.sequence_lengths for row in packed]
    assert rows == [[6, 2], [3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["labels"][1, 3:].eq(-100).all() and batch["input_ids"][1, 3:].eq(0).all()


def test_collate_flat_layout_is_one_row_without_padding():
    packed = pack_examples(_examples([6, 3, 2]), max_length=8)
    batch = collate_packed(packed, pad_token_id=0, layout="flat")
    assert batch["input_ids"].shape == (1, 11)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2]]


def test_collator_packing_option():
    tokenizer = word_tokenizer()
    examples = [
        {"prompt": "where is the capital of China", "completion": "Beijing"},
        {"prompt": "who wrote this book", "completion": "I do not know"},
        {"prompt": "a", "completion": "yes"},
    ]
    padded = PromptMaskingCollator(tokenizer, max_length=16)(examples)
    collator = PromptMaskingCollator(tokenizer, max_length=16, packing=True)
    packed = collator(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] <= 16
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # Same trained targets as the padded batch (counted after the shift, row by row).
    assert int(packed["labels"][:, 1:].ne(-100).sum()) == int(padded["labels"][:, 1:].ne(-100).sum())
    assert (
        collator.packing_stats.examples == 3 and collator.packing_stats.rows == packed["input_ids"].shape[0]
    )
    with pytest.raises(ValueError, match="max_length"):
        PromptMaskingCollator(tokenizer, packing=True)


def test_collator_packing_split_keeps_long_examples_whole_until_packing():
    tokenizer = word_tokenizer()
    long_completion = " ".join(["city"] * 20)
    collator = PromptMaskingCollator(tokenizer, max_length=8, packing=True, packing_overflow="split")
    batch = collator([{"prompt": "a", "completion": long_completion}])
    assert collator.stats.truncated_tokens == 0
    assert collator.packing_stats.split_examples == 1
    # <bos> a + 20 words + <eos> = 23 tokens in pieces of 8.
    assert collator.packing_stats.tokens == 23 and batch["input_ids"].shape == (3, 8)


# ---------------------------------------------------------------------- attention is block-diagonal


def _sequence_losses(model, batch: dict, packed_rows) -> list[float]:
    """Mean loss of each packed sequence, read from one forward pass over the packed batch."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    token_losses = causal_lm_loss(logits, batch["labels"], reduction="none")
    losses = []
    for row_index, row in enumerate(packed_rows):
        start = 0
        for length in row.sequence_lengths:
            # Position t of the sequence predicts label t + 1; the last position has no target inside it.
            segment = token_losses[row_index, start : start + length - 1]
            targets = batch["labels"][row_index, start + 1 : start + length].ne(-100).sum()
            losses.append(float(segment.sum() / targets.clamp(min=1)))
            start += length
    return losses


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_losses(attn_implementation):
    model = tiny_llama(attn_implementation=attn_implementation).train()
    assert model.config._attn_implementation == attn_implementation
    examples = _examples([9, 3, 14, 6, 5, 11, 2, 7], prompt_length=2, seed=1)
    packed = pack_examples(examples, max_length=16)
    assert any(len(row.sequence_lengths) > 1 for row in packed)
    batch = collate_packed(packed, pad_token_id=0)
    check_packing_support(model, batch["position_ids"], use_cache=False)

    with torch.no_grad():
        packed_losses = _sequence_losses(model, batch, packed)
    # The examples in the order they were packed (all distinct, so their ids identify them).
    packed_sequences = []
    for row in packed:
        start = 0
        for length in row.sequence_lengths:
            packed_sequences.append(row.input_ids[start : start + length])
            start += length
    order = [[example["input_ids"] for example in examples].index(ids) for ids in packed_sequences]
    assert sorted(order) == list(range(len(examples)))
    for packed_loss, index in zip(packed_losses, order, strict=True):
        example = examples[index]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits
        unpacked_loss = float(causal_lm_loss(logits, torch.tensor([example["labels"]])))
        assert packed_loss == pytest.approx(unpacked_loss, abs=1e-5, rel=1e-5)


def test_with_a_kv_cache_packed_sequences_leak_and_packing_is_refused():
    """transformers 5.24 skips packed-sequence detection when a cache exists (use_cache=True default)."""
    model = tiny_llama(attn_implementation="sdpa").train()
    examples = _examples([5, 7], prompt_length=0, seed=2)
    packed = pack_examples(examples, max_length=12)
    batch = collate_packed(packed, pad_token_id=0)
    with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    without_cache = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits
    second = slice(packed[0].sequence_lengths[0], 12)
    assert not torch.allclose(with_cache[0, second], without_cache[0, second], atol=1e-3)
    with pytest.raises(ValueError, match="use_cache=False"):
        check_packing_support(model)
    check_packing_support(model, use_cache=False)


def test_check_packing_support_knows_the_backends():
    model = tiny_llama(attn_implementation="sdpa")
    model.config.use_cache = False
    check_packing_support(model)
    wrapper = torch.nn.Module()  # DDP / FSDP1 style: the model is .module
    wrapper.module = model
    check_packing_support(wrapper)
    model.config._attn_implementation = "flash_attention_2"
    check_packing_support(model, torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="one row"):
        check_packing_support(model, torch.zeros(2, 10, dtype=torch.long))
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="not known"):
        check_packing_support(model)


def test_trainer_loss_on_a_packed_batch_equals_the_padded_batch(tmp_path):
    """The step loss (sum / trained tokens) is the same whether the batch is padded or packed."""
    tokenizer = word_tokenizer()
    model = tiny_llama()
    model.config.use_cache = False  # packed rows need no KV cache (see check_packing_support)
    examples = [
        {"prompt": "where is the capital of China", "completion": "Beijing"},
        {"prompt": "who wrote this book", "completion": "it was written by I do not know"},
        {"prompt": "a", "completion": "yes"},
        {"prompt": "what city", "completion": "Paris"},
    ]
    padded = PromptMaskingCollator(tokenizer, max_length=24)(examples)
    packed = PromptMaskingCollator(tokenizer, max_length=24, packing=True)(examples)
    assert packed["input_ids"].shape[0] < len(examples)
    trainer = ShiftLossTrainer(
        model=model, args=ShiftLossArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    )
    model.train()
    trained_tokens = padded["labels"][:, 1:].ne(-100).sum()
    with torch.no_grad():
        padded_loss = trainer.compute_loss(model, padded, num_items_in_batch=trained_tokens)
        packed_loss = trainer.compute_loss(model, packed, num_items_in_batch=trained_tokens)
    assert float(packed_loss) == pytest.approx(float(padded_loss), abs=1e-5)
