"""Dataset-level packing: best-fit decreasing, masked boundaries, block-diagonal attention, exact training."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, load_from_disk
from helpers import tiny_llama, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer, prepare_dataset
from hf_shift_loss.data import pack
from hf_shift_loss.data.batch import Batcher
from hf_shift_loss.data.encode import Encoder
from hf_shift_loss.data.pack import (
    PACKING_COLUMNS,
    best_fit_decreasing,
    check_packing_support,
    pack_dataset,
    pack_rows,
)
from hf_shift_loss.loss import causal_lm_loss


def _examples(lengths: list[int], prompt_length: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        input_ids = torch.randint(3, 64, (length,), generator=generator).tolist()
        labels = [-100] * min(prompt_length, length) + input_ids[prompt_length:]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def _columns(examples: list[dict]) -> dict[str, list]:
    return {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}


def _targets(labels: list[int]) -> int:
    return sum(1 for label in labels[1:] if label != -100)


def _sequences(row_ids: list[int], positions: list[int]) -> list[list[int]]:
    starts = [i for i, position in enumerate(positions) if position == 0] + [len(row_ids)]
    return [row_ids[a:b] for a, b in zip(starts, starts[1:], strict=False)]


# ---------------------------------------------------------------------- packing
def test_best_fit_decreasing_puts_each_sequence_into_the_fullest_row_that_fits():
    rows = best_fit_decreasing([3, 6, 2, 5, 4], capacity=10)
    # 6 opens row 0, 5 opens row 1, 4 fits row 0 (room 4: exact), 3 fits row 1 (room 5 -> 2), 2 fills it.
    assert rows == [[1, 4], [3, 0, 2]]
    with pytest.raises(ValueError, match="sequence 0 has 11 tokens"):
        best_fit_decreasing([11], capacity=10)


def test_first_label_of_every_packed_sequence_is_masked():
    examples = _examples([3, 4], prompt_length=0)
    packed = pack_rows(_columns(examples), max_length=8)
    assert len(packed["input_ids"]) == 1
    assert packed["position_ids"][0] == [0, 1, 2, 3, 0, 1, 2]
    labels = packed["labels"][0]
    assert labels[0] == -100 and labels[4] == -100  # the second sequence's first token: no cross target
    assert labels[1:4] == examples[1]["input_ids"][1:]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=25),
    max_length=st.integers(2, 24),
    overflow=st.sampled_from(["truncate", "split"]),
)
def test_packing_keeps_every_token_and_every_target(lengths, max_length, overflow):
    examples = _examples(lengths, prompt_length=3)
    packed = pack_rows(_columns(examples), max_length, overflow=overflow)
    assert all(len(row) <= max_length for row in packed["input_ids"])
    for ids, labels, positions in zip(
        packed["input_ids"], packed["labels"], packed["position_ids"], strict=True
    ):
        assert len(ids) == len(labels) == len(positions)
    kept = [e["input_ids"][:max_length] for e in examples] if overflow == "truncate" else None
    sequences = [
        seq
        for ids, pos in zip(packed["input_ids"], packed["position_ids"], strict=True)
        for seq in _sequences(ids, pos)
    ]
    tokens = sum(len(ids) for ids in packed["input_ids"])
    if overflow == "truncate":
        assert sorted(map(tuple, sequences)) == sorted(map(tuple, kept))
        expected_targets = sum(_targets(e["labels"][:max_length]) for e in examples)
    else:
        assert tokens == sum(lengths)
        expected_targets = sum(_targets(e["labels"]) for e in examples) - sum(packed["lost_boundary_targets"])
        assert sum(packed["split_examples"]) == sum(1 for length in lengths if length > max_length)
    # Every trained target survives packing, except those lost at split points (counted).
    assert sum(_targets(labels) for labels in packed["labels"]) == expected_targets


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="at least 2"):
        pack_rows(_columns(_examples([3])), max_length=1)
    with pytest.raises(ValueError, match="'truncate' or 'split'"):
        pack_rows(_columns(_examples([3])), max_length=8, overflow="drop")
    with pytest.raises(ValueError, match="packing needs max_length"):
        prepare_dataset(Dataset.from_list(_examples([3])), Encoder(word_tokenizer()), packing=True)


def test_prepared_packed_dataset_counts_rows_fill_and_splits():
    examples = _examples([9, 3, 14, 6, 5, 11, 4, 7, 25], prompt_length=2)
    encoder = Encoder(word_tokenizer(), max_length=16)
    truncated = prepare_dataset(Dataset.from_list(examples), encoder, packing=True)
    assert truncated.stats.truncated_tokens == 25 - 16 and truncated.stats.split_examples == 0
    split = prepare_dataset(Dataset.from_list(examples), encoder, packing=True, packing_overflow="split")
    stats = split.stats
    assert stats.truncated_tokens == 0 and stats.split_examples == 1 and stats.lost_boundary_targets == 1
    assert stats.total_tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.packed_rows == len(split.dataset) and stats.packed_capacity == 16 * len(split.dataset)
    assert stats.packing_fill == pytest.approx(stats.total_tokens / stats.packed_capacity)
    assert stats.trained_tokens == sum(_targets(row["labels"]) for row in split.dataset)
    assert set(split.dataset.column_names) == {"input_ids", "labels", "position_ids"}


def test_batcher_pads_packed_rows_with_a_block_of_their_own():
    packed = pack_rows(_columns(_examples([6, 3, 2])), max_length=8)
    rows = [dict(zip(packed, values, strict=True)) for values in zip(*packed.values(), strict=True)]
    batch = Batcher(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 8)
    # Row 1 holds 3 tokens ([3] -> positions 0,1,2); its padding restarts at 0 and is never trained.
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert batch["labels"][1, 3:].tolist() == [-100] * 5


# ---------------------------------------------------------------------- attention is block-diagonal
def _packed_batch(examples: list[dict], max_length: int) -> tuple[dict, list[list[int]]]:
    packed = pack_rows(_columns(examples), max_length)
    rows = [dict(zip(packed, values, strict=True)) for values in zip(*packed.values(), strict=True)]
    return Batcher(pad_token_id=0)(rows), [row["position_ids"] for row in rows]


def _sequence_losses(model, batch: dict, positions: list[list[int]]) -> list[tuple[list[int], float]]:
    """(sequence ids, mean loss) of each packed sequence, read from one forward pass over the packed batch."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    token_losses = causal_lm_loss(logits, batch["labels"], reduction="none")
    losses = []
    for row_index, row_positions in enumerate(positions):
        starts = [i for i, p in enumerate(row_positions) if p == 0] + [len(row_positions)]
        for start, end in zip(starts, starts[1:], strict=False):
            # Position t of the sequence predicts label t + 1; the last position has no target inside it.
            segment = token_losses[row_index, start : end - 1]
            targets = batch["labels"][row_index, start + 1 : end].ne(-100).sum()
            ids = batch["input_ids"][row_index, start:end].tolist()
            losses.append((ids, float(segment.sum() / targets.clamp(min=1))))
    return losses


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_losses(attn_implementation):
    model = tiny_llama(attn_implementation=attn_implementation).train()
    assert model.config._attn_implementation == attn_implementation
    examples = _examples([9, 3, 14, 6, 5, 11, 2, 7], prompt_length=2, seed=1)
    batch, positions = _packed_batch(examples, max_length=16)
    assert batch["input_ids"].shape[0] < len(examples)
    check_packing_support(model, batch["position_ids"], use_cache=False)
    with torch.no_grad():
        packed_losses = _sequence_losses(model, batch, positions)
    by_ids = {tuple(example["input_ids"]): example for example in examples}
    assert sorted(map(tuple, (ids for ids, _ in packed_losses))) == sorted(by_ids)
    for ids, packed_loss in packed_losses:
        example = by_ids[tuple(ids)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits
        unpacked_loss = float(causal_lm_loss(logits, torch.tensor([example["labels"]])))
        assert packed_loss == pytest.approx(unpacked_loss, abs=1e-5, rel=1e-5)


def test_with_a_kv_cache_packed_sequences_leak_and_packing_is_refused():
    """transformers skips packed-sequence detection when a cache exists (use_cache=True default)."""
    model = tiny_llama(attn_implementation="sdpa").train()
    batch, positions = _packed_batch(_examples([5, 7], prompt_length=0, seed=2), max_length=12)
    with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    without_cache = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits
    second = slice(positions[0].index(0, 1), 12)
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


# ---------------------------------------------------------------------- packed training == padded training
EXAMPLES = [
    {"prompt": "where is the capital of China", "completion": "The capital is Beijing"},
    {"prompt": "who wrote this book", "completion": "it was written by I do not know"},
    {"prompt": "a", "completion": "yes"},
    {"prompt": "what city", "completion": "Paris"},
    {"prompt": "is it a big city", "completion": "yes it is a big city"},
    {"prompt": "name a river", "completion": "no"},
]


def _trainer(tmp_path, packing: bool, loss_impl: str, padding_free: bool = False) -> ShiftLossTrainer:
    tokenizer = word_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    args = ShiftLossArguments(
        output_dir=str(tmp_path / f"{packing}-{padding_free}-{loss_impl}"),
        max_length=24,
        packing=packing,
        padding_free=padding_free,
        loss_impl=loss_impl,
        per_device_train_batch_size=len(EXAMPLES),  # every example (or every packed row) in the one step
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        per_device_eval_batch_size=4,
    )
    return ShiftLossTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(EXAMPLES),
        eval_dataset=Dataset.from_list(EXAMPLES),
        processing_class=tokenizer,
    )


def _one_step(tmp_path, packing: bool, loss_impl: str, padding_free: bool = False) -> tuple[dict, list]:
    trainer = _trainer(tmp_path, packing, loss_impl, padding_free)
    trainer.train()
    rows = len(trainer.train_dataset)
    assert rows < len(EXAMPLES) if packing else rows == len(EXAMPLES)
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return parameters, trainer.state.log_history


@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_packed_training_equals_padded_training(tmp_path, loss_impl):
    padded_params, padded_logs = _one_step(tmp_path, packing=False, loss_impl=loss_impl)
    packed_params, packed_logs = _one_step(tmp_path, packing=True, loss_impl=loss_impl)
    assert packed_logs[0]["loss"] == pytest.approx(padded_logs[0]["loss"], rel=1e-5)
    assert packed_logs[0]["trained_tokens"] == padded_logs[0]["trained_tokens"]
    assert packed_logs[0]["data/packing_fill"] > 0.5 and "data/packing_fill" not in padded_logs[0]
    for name, value in padded_params.items():
        difference = (packed_params[name] - value).norm() / value.norm().clamp(min=1e-12)
        assert difference < 1e-4, name


# ---------------------------------------------------------------------- padding-free micro-batches
def test_padding_free_batcher_lays_rows_end_to_end():
    packed = pack_rows(_columns(_examples([3, 2, 4], prompt_length=0)), max_length=5)
    rows = [dict(zip(packed, values, strict=True)) for values in zip(*packed.values(), strict=True)]
    rows.append({"input_ids": [7, 8], "labels": [7, 8]})  # an unpacked row: its first label is no target
    batch = Batcher(pad_token_id=0, pad_to_multiple_of=4, padding_free=True)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (1, 12)  # 4 + 5 + 2 tokens, then a padding block of 1
    # Packed rows [4] and [3, 2], then the unpacked [7, 8], then the padding block.
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 0]
    assert batch["input_ids"][0, 9:].tolist() == [7, 8, 0]
    # Every sequence's first label is masked; the padding block is never trained.
    starts = batch["position_ids"][0] == 0
    assert batch["labels"][0][starts].eq(-100).all()
    trained = sum(_targets(row["labels"]) for row in rows)
    assert int(batch["labels"][0, 1:].ne(-100).sum()) == trained == 3 + 2 + 1 + 1


@pytest.mark.parametrize(("packing", "loss_impl"), [(False, "eager"), (False, "fused"), (True, "fused")])
def test_padding_free_training_equals_padded_training(tmp_path, packing, loss_impl):
    trainer = _trainer(tmp_path, packing, loss_impl, padding_free=True)
    assert trainer.get_train_dataloader().__iter__().__next__()["input_ids"].shape[0] == 1
    eval_batch = next(iter(trainer.get_eval_dataloader()))
    # Evaluation stays padded: one dataset row (example, or packed row) per batch row.
    assert eval_batch["input_ids"].shape[0] == min(4, len(trainer.eval_dataset)) > 1
    padded_params, padded_logs = _one_step(tmp_path, packing=False, loss_impl=loss_impl)
    free_params, free_logs = _one_step(tmp_path, packing=packing, loss_impl=loss_impl, padding_free=True)
    assert free_logs[0]["loss"] == pytest.approx(padded_logs[0]["loss"], rel=1e-5)
    assert free_logs[0]["trained_tokens"] == padded_logs[0]["trained_tokens"]
    for name, value in padded_params.items():
        difference = (free_params[name] - value).norm() / value.norm().clamp(min=1e-12)
        assert difference < 1e-4, name


def test_padding_free_evaluation_is_the_padded_evaluation(tmp_path):
    padded = _trainer(tmp_path, packing=False, loss_impl="fused").evaluate()
    free = _trainer(tmp_path, packing=False, loss_impl="fused", padding_free=True).evaluate()
    assert free["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
    assert free["eval_trained_tokens"] == padded["eval_trained_tokens"] > 0


def test_a_streamed_dataset_is_packed_in_windows_like_a_map_style_one():
    examples = _examples([9, 3, 14, 6, 5, 11, 4, 7], prompt_length=2)
    encoder = Encoder(word_tokenizer(), max_length=16)
    whole = prepare_dataset(Dataset.from_list(examples), encoder, packing=True)
    streamed = prepare_dataset(Dataset.from_list(examples).to_iterable_dataset(), encoder, packing=True)
    assert streamed.stats is None  # counted as rows are read
    rows = list(streamed.dataset)
    assert set(rows[0]) == {"input_ids", "labels", "position_ids"}
    # One window holds the whole (small) dataset: the same rows as packing it at once.
    assert [row["input_ids"] for row in rows] == whole.dataset["input_ids"]
    assert sum(_targets(row["labels"]) for row in rows) == whole.stats.trained_tokens


# ---------------------------------------------------------------------- the flat-memory packer = the old one
def _reference_pack_rows(batch: dict, max_length: int, overflow: str = "truncate") -> dict:
    """The packer as it was before issue 22 (Python lists over the whole dataset, bisect over sorted free
    rooms), kept only here as the reference the Arrow packer must reproduce."""
    import bisect

    def reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
        rows: list[list[int]] = []
        free_rooms: list[tuple[int, int]] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            length = lengths[index]
            slot = bisect.bisect_left(free_rooms, (length, -1))
            if slot == len(free_rooms):
                row_index, room = len(rows), capacity
                rows.append([])
            else:
                room, row_index = free_rooms.pop(slot)
            rows[row_index].append(index)
            if room > length:
                bisect.insort(free_rooms, (room - length, row_index))
        return rows

    pieces, split_examples, lost = [], 0, 0
    for input_ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        if overflow == "truncate" or len(input_ids) <= max_length:
            pieces.append((input_ids[:max_length], labels[:max_length]))
            continue
        starts = range(0, len(input_ids), max_length)
        split_examples += 1
        lost += sum(1 for start in starts[1:] if labels[start] != -100)
        pieces.extend((input_ids[s : s + max_length], labels[s : s + max_length]) for s in starts)
    packed: dict[str, list] = {name: [] for name in PACKING_COLUMNS}
    for members in reference_bfd([len(ids) for ids, _ in pieces], max_length):
        row_ids, row_labels, row_positions = [], [], []
        for member in members:
            input_ids, labels = pieces[member]
            row_ids += input_ids
            row_labels += [-100, *labels[1:]]
            row_positions += range(len(input_ids))
        for name, value in zip(PACKING_COLUMNS, (row_ids, row_labels, row_positions, 0, 0), strict=True):
            packed[name].append(value)
    if packed["input_ids"]:
        packed["split_examples"][0], packed["lost_boundary_targets"][0] = split_examples, lost
    return packed


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    max_length=st.integers(2, 24),
    overflow=st.sampled_from(["truncate", "split"]),
    prompt_length=st.integers(0, 5),
)
def test_arrow_packer_writes_the_rows_of_the_list_packer(lengths, max_length, overflow, prompt_length):
    columns = _columns(_examples(lengths, prompt_length=prompt_length))
    expected = _reference_pack_rows(columns, max_length, overflow)
    assert pack_rows(columns, max_length, overflow=overflow) == expected
    packed = pack_dataset(Dataset.from_dict(columns), max_length, overflow, new_fingerprint="f" * 16)
    assert packed.dataset.to_dict() == {name: expected[name] for name in PACKING_COLUMNS[:3]}
    assert packed.split_examples == sum(expected["split_examples"])
    assert packed.lost_boundary_targets == sum(expected["lost_boundary_targets"])


def test_pack_dataset_reads_through_filters_and_writes_in_batches(tmp_path, monkeypatch):
    """A filtered (index-mapped), file-backed dataset packed a few rows per write = the list packer."""
    monkeypatch.setattr(pack, "PACK_WRITE_ROWS", 3)
    monkeypatch.setattr(pack, "LENGTH_READ_ROWS", 7)
    examples = _examples([5, 17, 9, 1, 30, 12, 8, 3, 22, 6, 14, 2, 19, 11, 4], prompt_length=3)
    Dataset.from_list(examples).save_to_disk(str(tmp_path / "rows"))
    on_disk = load_from_disk(str(tmp_path / "rows")).filter(lambda row, i: i % 4 != 1, with_indices=True)
    kept = [e for i, e in enumerate(examples) if i % 4 != 1]
    for overflow in ("truncate", "split"):
        expected = _reference_pack_rows(_columns(kept), 16, overflow)
        packed = pack_dataset(on_disk, 16, overflow)
        assert packed.dataset.cache_files, "written to a file next to the dataset, not held in memory"
        assert packed.dataset.to_dict() == {name: expected[name] for name in PACKING_COLUMNS[:3]}
        assert packed.lost_boundary_targets == sum(expected["lost_boundary_targets"])
        assert (packed.lost_boundary_targets > 0) == (overflow == "split")
    with pytest.raises(ValueError, match="row 1: 'labels' has 2 entries but 'input_ids' has 3"):
        pack_rows({"input_ids": [[1, 2], [1, 2, 3]], "labels": [[1, 2], [1, 2]]}, max_length=4)
