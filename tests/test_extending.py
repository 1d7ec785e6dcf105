"""Subclassing ShiftLossTrainer: loss_weights, the token_loss hook, last_hidden_state and log_metric.

docs/extending.md is the guide; these are its promises, each with exact numbers or an equivalence:
per-token weights (ones == none, x2 doubles, eager == fused, accumulation, packing, padding-free; two
ranks in tests/test_distributed.py), a custom per-token loss on both paths, the issue's auxiliary-term
snippet on both paths, and extra metrics averaged over the log window.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from helpers import fused_inputs, make_args, tiny_llama, word_tokenizer

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer, causal_lm_loss, fused_linear_cross_entropy
from hf_shift_loss.data import Batcher, Encoder, prepare_dataset
from hf_shift_loss.data.pack import pack_rows
from hf_shift_loss.loss import LogitsNotComputedError, apply_token_loss

PAIRS = [
    ("where is the capital of China", "The capital is Beijing"),
    ("who wrote this book", "it was written by I do not know"),
    ("a", "yes"),
    ("what city", "Paris"),
]


def weighted_rows(seed: int = 0, scale: float | None = None) -> list[dict]:
    """The pairs pre-tokenized, each token with its own uneven weight in [0.25, 2.25) (or ``scale``)."""
    encoder = Encoder(word_tokenizer())
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, completion in PAIRS:
        encoded = encoder({"prompt": prompt, "completion": completion})
        length = len(encoded["input_ids"])
        weights = (
            torch.full((length,), scale)
            if scale is not None
            else 0.25 + 2 * torch.rand(length, generator=generator)
        )
        rows.append(
            {"input_ids": encoded["input_ids"], "labels": encoded["labels"], "loss_weights": weights.tolist()}
        )
    return rows


def unweighted(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "loss_weights"} for row in rows]


def one_step_args(tmp_path, **overrides) -> ShiftLossArguments:
    options = {"train_sampling_strategy": "sequential", "max_length": 24} | overrides
    return make_args(tmp_path, **options)


def train(tmp_path, rows, trainer_class=ShiftLossTrainer, model=None, **overrides):
    """One run on ``rows`` prepared by the trainer; (parameters after, log lines with a loss, trainer)."""
    tokenizer = word_tokenizer()
    name = "-".join(f"{key}{value}" for key, value in sorted(overrides.items())) or "default"
    trainer = trainer_class(
        model=model if model is not None else tiny_llama(len(tokenizer)),
        args=one_step_args(tmp_path / f"{trainer_class.__name__}-{name}", **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return parameters, [entry for entry in trainer.state.log_history if "loss" in entry], trainer


def initial_parameters(tmp_path) -> dict:
    return {name: p.detach().clone() for name, p in tiny_llama(len(word_tokenizer())).named_parameters()}


def assert_same_parameters(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=name)


def reference_loss(rows: list[dict], token_loss=None) -> float:
    """The weighted loss of all rows as one batch on the untrained model, from its full logits."""
    batch = Batcher(pad_token_id=0)(rows)
    model = tiny_llama(len(word_tokenizer()))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    weights = batch.get("loss_weights")
    if token_loss is None:
        return causal_lm_loss(logits, batch["labels"], loss_weights=weights).item()
    per_position = causal_lm_loss(logits, batch["labels"], reduction="none")
    return apply_token_loss(per_position, batch["labels"], token_loss, loss_weights=weights).item()


def focal(token_losses: torch.Tensor) -> torch.Tensor:
    return (1 - torch.exp(-token_losses)) ** 2 * token_losses


class FocalTrainer(ShiftLossTrainer):
    def token_loss(self, token_losses: torch.Tensor) -> torch.Tensor:
        return focal(token_losses)


# ---------------------------------------------------------------------- the issue's snippet
class LogitsRegularized(ShiftLossTrainer):
    """The issue's snippet, verbatim: an auxiliary term on outputs.logits."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        loss = loss + 1e-3 * outputs.logits.float().pow(2).mean()  # any auxiliary term
        return (loss, outputs) if return_outputs else loss


class HiddenRegularized(ShiftLossTrainer):
    """The same auxiliary term on the hidden states, which both loss paths hand on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        loss = loss + 0.1 * outputs.last_hidden_state.float().pow(2).mean()
        return (loss, outputs) if return_outputs else loss


def test_the_issue_snippet_stops_on_the_default_path_with_the_loss_impl_error(tmp_path):
    with pytest.raises(LogitsNotComputedError) as error:
        train(tmp_path, unweighted(weighted_rows()), LogitsRegularized)
    message = str(error.value)
    assert "loss_impl='eager'" in message and "outputs.last_hidden_state" in message
    assert "NoneType" not in message
    assert isinstance(error.value, AttributeError) and isinstance(error.value, KeyError)


def test_the_issue_snippet_trains_with_the_eager_loss(tmp_path):
    rows = unweighted(weighted_rows())
    plain, plain_logs, _ = train(tmp_path, rows, loss_impl="eager")
    regularized, logs, _ = train(tmp_path, rows, LogitsRegularized, loss_impl="eager")
    assert logs[0]["loss"] > plain_logs[0]["loss"]  # the auxiliary term is in the loss
    assert any(not torch.equal(regularized[name], plain[name]) for name in plain)


def test_fused_outputs_have_no_logits_to_read(tmp_path):
    trainer = ShiftLossTrainer(model=tiny_llama(len(word_tokenizer())), args=one_step_args(tmp_path))
    batch = Batcher(pad_token_id=0)(unweighted(weighted_rows()))
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert not hasattr(outputs, "logits") and "logits" not in outputs
    with pytest.raises(KeyError, match="loss_impl='eager'"):
        outputs["logits"]
    assert outputs.last_hidden_state.shape == (*batch["input_ids"].shape, 32)
    # An attribute, not a key: Trainer.prediction_step hands every key to compute_metrics as predictions.
    assert "last_hidden_state" not in outputs and "last_hidden_state" not in repr(outputs)
    eager = ShiftLossTrainer(model=trainer.model, args=one_step_args(tmp_path, loss_impl="eager"))
    _, outputs = eager.compute_loss(eager.model, batch, return_outputs=True)
    assert "last_hidden_state" not in outputs and outputs.logits.shape == (*batch["input_ids"].shape, 38)
    assert outputs.last_hidden_state.shape == (*batch["input_ids"].shape, 32)


def test_an_auxiliary_term_on_the_hidden_states_is_the_same_on_both_paths(tmp_path):
    rows = unweighted(weighted_rows())
    eager, eager_logs, _ = train(tmp_path, rows, HiddenRegularized, loss_impl="eager")
    fused, fused_logs, _ = train(tmp_path, rows, HiddenRegularized, loss_impl="fused")
    plain, plain_logs, _ = train(tmp_path, rows, loss_impl="fused")
    assert fused_logs[0]["loss"] == pytest.approx(eager_logs[0]["loss"], rel=1e-5)
    assert fused_logs[0]["loss"] > plain_logs[0]["loss"] + 0.05  # mean square of RMS-normed states ~ 1
    assert_same_parameters(fused, eager)


# ---------------------------------------------------------------------- loss_weights
@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_ones_give_exactly_the_unweighted_update(tmp_path, loss_impl):
    plain, plain_logs, _ = train(tmp_path, unweighted(weighted_rows()), loss_impl=loss_impl)
    ones, ones_logs, _ = train(tmp_path, weighted_rows(scale=1.0), loss_impl=loss_impl)
    assert ones_logs[0]["loss"] == plain_logs[0]["loss"]
    assert_same_parameters(ones, plain, rtol=0, atol=0)


@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_weights_of_two_double_the_loss_and_the_update(tmp_path, loss_impl):
    before = initial_parameters(tmp_path)
    ones, ones_logs, _ = train(tmp_path, weighted_rows(scale=1.0), loss_impl=loss_impl)
    twos, twos_logs, _ = train(tmp_path, weighted_rows(scale=2.0), loss_impl=loss_impl)
    assert twos_logs[0]["loss"] == pytest.approx(2 * ones_logs[0]["loss"], rel=1e-6)
    assert twos_logs[0]["trained_tokens"] == ones_logs[0]["trained_tokens"]  # the count is not weighted
    for name, value in before.items():
        torch.testing.assert_close(twos[name] - value, 2 * (ones[name] - value), rtol=1e-4, atol=1e-6)


def test_uneven_weights_give_the_reference_loss_on_both_paths(tmp_path):
    rows = weighted_rows()
    expected = reference_loss(rows)
    assert expected != pytest.approx(reference_loss(unweighted(rows)), rel=1e-3)
    eager, eager_logs, _ = train(tmp_path, rows, loss_impl="eager")
    fused, fused_logs, _ = train(tmp_path, rows, loss_impl="fused")
    assert eager_logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert fused_logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # Metrics stay unweighted: the same accuracy and count as without weights.
    _, plain_logs, _ = train(tmp_path, unweighted(rows), loss_impl="fused")
    assert fused_logs[0]["mean_token_accuracy"] == plain_logs[0]["mean_token_accuracy"]
    assert fused_logs[0]["trained_tokens"] == plain_logs[0]["trained_tokens"] == 18
    assert_same_parameters(fused, eager)


@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_uneven_weights_batch_four_equals_two_by_accumulation_two(tmp_path, loss_impl):
    rows = weighted_rows()
    whole, whole_logs, _ = train(tmp_path, rows, loss_impl=loss_impl)
    split, split_logs, _ = train(
        tmp_path, rows, loss_impl=loss_impl, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    assert split_logs[0]["loss"] == pytest.approx(whole_logs[0]["loss"], rel=1e-5)
    assert_same_parameters(split, whole)


@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_uneven_weights_packed_and_padding_free_equal_padded(tmp_path, loss_impl):
    rows = weighted_rows()
    padded, padded_logs, padded_trainer = train(tmp_path, rows, loss_impl=loss_impl)
    packed, packed_logs, packed_trainer = train(tmp_path, rows, loss_impl=loss_impl, packing=True)
    free, free_logs, _ = train(tmp_path, rows, loss_impl=loss_impl, padding_free=True)
    assert len(packed_trainer.train_dataset) < len(padded_trainer.train_dataset)
    assert "loss_weights" in packed_trainer.train_dataset.column_names
    for logs in (packed_logs, free_logs):
        assert logs[0]["loss"] == pytest.approx(padded_logs[0]["loss"], rel=1e-5)
    assert_same_parameters(packed, padded)
    assert_same_parameters(free, padded)


def test_a_per_example_weight_is_the_per_token_weight_broadcast(tmp_path):
    rows = [
        {"prompt": p, "completion": c, "loss_weights": w}
        for (p, c), w in zip(PAIRS, [1, 3, 0.5, 2], strict=True)
    ]
    by_example, example_logs, _ = train(tmp_path, rows)
    broadcast = weighted_rows(scale=1.0)
    for row, weight in zip(broadcast, [1, 3, 0.5, 2], strict=True):
        row["loss_weights"] = [float(weight)] * len(row["input_ids"])
    by_token, token_logs, _ = train(tmp_path, broadcast)
    assert example_logs[0]["loss"] == pytest.approx(token_logs[0]["loss"], rel=1e-6)
    assert_same_parameters(by_example, by_token, rtol=1e-6, atol=1e-8)


def test_packing_moves_the_weights_with_their_tokens():
    packed = pack_rows(
        {
            "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
            "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9]],
            "loss_weights": [[0.1, 0.2, 0.3], [0.4, 0.5], [0.6, 0.7, 0.8, 0.9]],
        },
        max_length=5,
        overflow="split",
    )
    assert packed["input_ids"] == [[6, 7, 8, 9], [1, 2, 3, 4, 5]]
    assert packed["loss_weights"] == [[0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4, 0.5]]
    assert packed["labels"][1] == [-100, 2, 3, -100, 5]  # the boundary token stays untrained


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"loss_type": "dft"}])
def test_fused_weights_equal_eager_weights_with_their_gradients(reduction, sync_free, options):
    """Loss and gradients wrt hidden, weight and bias; chunks of 5 rows, so weights cross chunks."""
    hidden, weight, bias, labels = fused_inputs(with_bias=True)
    weights = 0.25 + 2 * torch.rand(labels.shape, generator=torch.Generator().manual_seed(7))
    upstream = torch.rand(labels.shape, generator=torch.Generator().manual_seed(8))  # for "none"

    def run(loss_of):
        for tensor in (hidden, weight, bias):
            tensor.grad = None
        loss = loss_of(loss_weights=weights, reduction=reduction, **options)
        (loss * upstream if reduction == "none" else loss).sum().backward()
        return [loss.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()]

    expected = run(lambda **kwargs: causal_lm_loss(hidden @ weight.T + bias, labels, **kwargs))
    actual = run(
        lambda **kwargs: fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, chunk_size=5, sync_free=sync_free, **kwargs
        )
    )
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unweighted = causal_lm_loss(hidden @ weight.T + bias, labels, reduction=reduction, **options)
    assert not torch.allclose(expected[0], unweighted)


def test_sync_free_ignores_the_weight_of_an_untrained_position():
    hidden, weight, _, labels = fused_inputs()
    weights = torch.ones(labels.shape)
    untrained = (labels == -100).nonzero()[0]
    weights[tuple(untrained)] = math.nan  # unchecked in sync-free mode, and never read
    loss = fused_linear_cross_entropy(hidden, weight, labels, loss_weights=weights, sync_free=True)
    torch.testing.assert_close(loss, fused_linear_cross_entropy(hidden, weight, labels), rtol=1e-6, atol=0)


def test_bad_weights_are_named_by_row_and_position(tmp_path):
    encoder = Encoder(word_tokenizer())
    with pytest.raises(ValueError, match="row 3: 'loss_weights' has 2 entries but 'input_ids' has 3"):
        encoder({"input_ids": [1, 5, 6], "loss_weights": [1.0, 1.0]}, 3)
    with pytest.raises(
        ValueError, match=r"row 2, column 'loss_weights', position 1: loss weight nan is not a finite"
    ):
        encoder({"input_ids": [1, 5, 6], "loss_weights": [1.0, math.nan, 1.0]}, 2)
    with pytest.raises(ValueError, match="one number for every token"):
        encoder({"prompt": "a", "completion": "yes", "loss_weights": [1.0, 2.0]}, 0)
    labels = torch.tensor([[-100, 5, 6]])
    hidden, weight = torch.randn(1, 3, 4), torch.randn(40, 4)
    bad = torch.tensor([[1.0, 1.0, math.inf]])
    for loss in (
        lambda w: causal_lm_loss(hidden @ weight.T, labels, loss_weights=w),
        lambda w: fused_linear_cross_entropy(hidden, weight, labels, loss_weights=w),
    ):
        with pytest.raises(ValueError, match="loss_weights at row 0, position 2 is inf"):
            loss(bad)
        with pytest.raises(
            ValueError, match=r"loss_weights shape \(1, 2\) does not match labels shape \(1, 3\)"
        ):
            loss(torch.ones(1, 2))
    with pytest.raises(ValueError, match="row 1 of this batch has no loss_weights but row 0 has"):
        Batcher(pad_token_id=0)(
            [{"input_ids": [1], "labels": [1], "loss_weights": [1.0]}, {"input_ids": [1], "labels": [1]}]
        )


def test_prepared_weights_are_cut_with_their_tokens():
    rows = weighted_rows()
    prepared = prepare_dataset(
        Dataset.from_list(rows), Encoder(word_tokenizer(), max_length=5, train_on="all")
    )
    for row, original in zip(prepared.dataset, rows, strict=True):
        assert row["loss_weights"] == pytest.approx(original["loss_weights"][:5])


# ---------------------------------------------------------------------- the token_loss hook
def test_focal_hook_gives_the_reference_loss_on_both_paths(tmp_path):
    rows = weighted_rows()
    expected = reference_loss(rows, token_loss=focal)
    assert expected < reference_loss(rows)  # focal down-weights every token
    eager, eager_logs, eager_trainer = train(tmp_path, rows, FocalTrainer, loss_impl="eager")
    fused, fused_logs, fused_trainer = train(tmp_path, rows, FocalTrainer, loss_impl="fused")
    assert fused_trainer.loss_path(fused_trainer.model).name == "fused"
    assert eager_logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert fused_logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_parameters(fused, eager)


def test_focal_hook_is_exact_under_accumulation(tmp_path):
    rows = weighted_rows()
    whole, whole_logs, _ = train(tmp_path, rows, FocalTrainer)
    split, split_logs, _ = train(
        tmp_path, rows, FocalTrainer, per_device_train_batch_size=1, gradient_accumulation_steps=4
    )
    assert split_logs[0]["loss"] == pytest.approx(whole_logs[0]["loss"], rel=1e-5)
    assert_same_parameters(split, whole)


def test_the_hook_is_decided_once_and_only_when_overridden(tmp_path, monkeypatch):
    calls = []

    class Counting(ShiftLossTrainer):
        def token_loss(self, token_losses):
            calls.append(token_losses.shape)
            return token_losses

    rows = unweighted(weighted_rows())
    plain, plain_logs, plain_trainer = train(tmp_path, rows)
    counted, counted_logs, counted_trainer = train(tmp_path, rows, Counting)
    assert plain_trainer._token_loss is None and counted_trainer._token_loss is not None
    assert calls == [torch.Size([18])]  # one micro-batch, its 18 trained tokens
    assert counted_logs[0]["loss"] == pytest.approx(plain_logs[0]["loss"], rel=1e-6)
    assert_same_parameters(counted, plain)


def test_a_hook_returning_another_shape_is_refused(tmp_path):
    class Summing(ShiftLossTrainer):
        def token_loss(self, token_losses):
            return token_losses.sum()

    with pytest.raises(ValueError, match=r"returned \(\) for \(18,\) token losses"):
        train(tmp_path, unweighted(weighted_rows()), Summing)


# ---------------------------------------------------------------------- log_metric
class StepLogging(ShiftLossTrainer):
    """Logs the step number with weight step + 1, and during evaluation a constant."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            step = self.state.global_step
            self.log_metric("step_number", torch.tensor(float(step)), weight=step + 1)
        else:
            self.log_metric("probe", 3.0)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_log_metric_is_averaged_over_the_logging_window(tmp_path):
    rows = unweighted(weighted_rows())
    _, logs, trainer = train(
        tmp_path, rows, StepLogging, max_steps=4, per_device_train_batch_size=1, logging_steps=2
    )
    # Steps 0, 1 then 2, 3 (the step counter moves after each step), weighted by step + 1.
    assert [entry["step_number"] for entry in logs] == [
        pytest.approx(2 / 3),
        pytest.approx((2 * 3 + 3 * 4) / 7),
    ]
    assert trainer._loss_metrics.custom.sums == {}
    metrics = trainer.evaluate(Dataset.from_list(rows))
    assert metrics["eval_probe"] == 3.0 and "step_number" not in metrics


def test_log_metric_refuses_built_in_names_and_tensors_of_many_values(tmp_path):
    trainer = ShiftLossTrainer(model=tiny_llama(len(word_tokenizer())), args=one_step_args(tmp_path))
    with pytest.raises(ValueError, match="'mean_token_accuracy'"):
        trainer.log_metric("mean_token_accuracy", 1.0)
    with pytest.raises(ValueError, match="'eval_x'"):
        trainer.log_metric("eval_x", 1.0)
    with pytest.raises(
        ValueError, match=r"the value must be a number or a one-element tensor, got shape \(3,\)"
    ):
        trainer.log_metric("x", torch.ones(3))


def test_log_metric_window_survives_a_checkpoint():
    """Saved summed over ranks: rank 0 restores the sums, another rank the names at 0 (same names to reduce)."""
    from hf_shift_loss.trainer import _LossMetrics

    class OneProcess:
        num_processes = 1

        @staticmethod
        def gather(tensor):
            return tensor

        @staticmethod
        def reduce(tensor, reduction):
            return tensor

    cpu = torch.device("cpu")
    metrics = _LossMetrics()
    metrics.custom.add("x", torch.tensor(2.0), 3.0, cpu)
    state = metrics.state(OneProcess(), torch.tensor(0.0), 0)
    assert state["window_custom"] == {"x": [6.0, 3.0]}
    restored, _ = _LossMetrics.from_state(state, 0, 1, cpu)
    restored.custom.add("x", torch.tensor(4.0), 1.0, cpu)
    assert restored.custom.pop(OneProcess()) == {"x": pytest.approx((2 * 3 + 4) / 4)}
    other_rank, _ = _LossMetrics.from_state(state, 1, 2, cpu)
    assert other_rank.custom.sums["x"].tolist() == [0.0, 0.0]
