"""fused_linear_cross_entropy has exactly the meaning of causal_lm_loss(hidden @ weight.T + bias, labels)."""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED_SHAPE, MatmulCounter, fused_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_shift_loss.loss import (
    causal_lm_loss,
    count_correct_tokens,
    default_chunk_size,
    fused_linear_cross_entropy,
)
from hf_shift_loss.loss.kernel import _GradientAccumulator

BATCH, SEQ, HIDDEN, VOCAB = FUSED_SHAPE


def eager_loss(hidden, weight, bias, labels, **options) -> torch.Tensor:
    # F.linear is what nn.Linear (an lm_head) runs: in bfloat16 the bias is added before rounding.
    return causal_lm_loss(torch.nn.functional.linear(hidden, weight, bias), labels, **options)


def loss_and_grads(loss_fn, hidden, weight, bias, labels, upstream: torch.Tensor | None = None, **options):
    """The loss and d(sum(loss * upstream))/d(hidden, weight[, bias])."""
    loss = loss_fn(hidden, weight, bias, labels, **options)
    weighted = loss if upstream is None else (loss * upstream).sum()
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    return loss, torch.autograd.grad(weighted, inputs)


def fused_loss(hidden, weight, bias, labels, **options) -> torch.Tensor:
    return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **options)


def assert_matches_eager(hidden, weight, bias, labels, grad_rtol: float = 1e-4, **options) -> None:
    fused = fused_loss(hidden, weight, bias, labels, **options)
    upstream = torch.randn(fused.shape, generator=torch.Generator().manual_seed(1)) if fused.dim() else None
    loss, grads = loss_and_grads(fused_loss, hidden, weight, bias, labels, upstream, **options)
    options.pop("chunk_size", None)
    expected, expected_grads = loss_and_grads(eager_loss, hidden, weight, bias, labels, upstream, **options)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=grad_rtol, atol=grad_rtol * 1e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_causal_lm_loss(
    reduction: str, label_smoothing: float, z_loss: float, with_bias: bool
) -> None:
    hidden, weight, bias, labels = fused_inputs(with_bias=with_bias)
    # 5 does not divide the trained rows: the last chunk is partial.
    assert_matches_eager(
        hidden,
        weight,
        bias,
        labels,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_size=5,
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
def test_any_chunk_size_gives_the_same_loss(chunk_size: int | None) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=2, with_bias=True)
    assert_matches_eager(hidden, weight, bias, labels, chunk_size=chunk_size, z_loss=1e-3)


@pytest.mark.parametrize("num_items_in_batch", [5, 40.0, torch.tensor(23)])
def test_num_items_in_batch_is_the_mean_denominator(num_items_in_batch) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=3)
    assert_matches_eager(hidden, weight, bias, labels, num_items_in_batch=num_items_in_batch, chunk_size=4)
    summed = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
    mean = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items_in_batch)
    torch.testing.assert_close(mean, summed / float(num_items_in_batch))


def test_shift_false_and_flat_tokens() -> None:
    hidden, weight, bias, labels = fused_inputs(seed=4)
    assert_matches_eager(hidden, weight, bias, labels, shift=False, chunk_size=6)
    # [tokens, hidden] with [tokens] labels: one sequence.
    flat_hidden = hidden.detach()[0].requires_grad_()
    assert_matches_eager(flat_hidden, weight, bias, labels[0], chunk_size=6)


def test_reduction_none_is_zero_where_not_trained() -> None:
    hidden, weight, _, labels = fused_inputs(seed=5)
    token_losses = fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    assert token_losses.shape == labels.shape
    assert (token_losses[targets == -100] == 0).all()
    assert (token_losses[targets != -100] > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_trained_token_is_zero_loss_and_zero_grads(reduction: str) -> None:
    hidden, weight, bias, labels = fused_inputs(with_bias=True)
    labels[:, 1:] = -100  # only the first column is trained, and the shift drops it
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)
    assert not loss.isnan().any()
    assert (loss == 0).all()
    loss.sum().backward()
    for tensor in (hidden, weight, bias):
        assert tensor.grad is not None
        assert (tensor.grad == 0).all()


def test_gradient_buffers_are_written_by_the_first_chunk_or_zeroed_when_there_is_none() -> None:
    hidden, weight, bias = torch.randn(6, 4), torch.randn(5, 4), torch.randn(5)
    untouched = _GradientAccumulator(hidden, weight, bias, (True, True, True), rows_per_chunk=2)
    untouched.weight.fill_(float("nan"))  # what an uninitialized buffer may hold
    untouched.bias.fill_(float("nan"))
    untouched.finish()
    assert (untouched.weight == 0).all() and (untouched.bias == 0).all()
    grads = _GradientAccumulator(hidden, weight, bias, (True, True, True), rows_per_chunk=2)
    grads.weight.fill_(float("nan"))
    grads.bias.fill_(float("nan"))
    grad_logits = torch.randn(2, 5)
    for chunk in (torch.tensor([0, 3]), torch.tensor([4, 5])):  # the second chunk adds to the first
        grads.add_chunk(grad_logits, None, hidden[chunk], chunk)
    grads.finish()
    expected = grad_logits.t() @ hidden[[0, 3]] + grad_logits.t() @ hidden[[4, 5]]
    assert torch.allclose(grads.weight, expected, atol=1e-6)
    assert torch.allclose(grads.bias, 2 * grad_logits.sum(0), atol=1e-6)


def trained_token_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_skips_the_weight_gradient(reduction: str) -> None:
    hidden, weight, _, labels = fused_inputs(seed=6)
    trained_flops = 2 * trained_token_count(labels) * HIDDEN * VOCAB  # one matmul over the trained rows

    with MatmulCounter() as counter:
        fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=4).sum().backward()
    recompute = 1 if reduction == "none" else 0  # "none" recomputes the logits in backward
    assert counter.matmul_flops == (3 + recompute) * trained_flops
    assert weight.grad is not None

    frozen = weight.detach().requires_grad_(False)
    hidden.grad = None
    with MatmulCounter() as counter:
        fused_linear_cross_entropy(hidden, frozen, labels, reduction=reduction, chunk_size=4).sum().backward()
    assert counter.matmul_flops == (2 + recompute) * trained_flops
    assert frozen.grad is None
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_never_more_than_one_chunk_of_logits() -> None:
    hidden, weight, _, labels = fused_inputs(seed=7, batch=4, seq=64, vocab=500, hidden_size=8)
    chunk_size = 16
    with MatmulCounter() as counter:
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size).backward()
    # The weight gradient [vocab, hidden] is the largest tensor; the logits never exceed one chunk.
    assert counter.largest_output == max(chunk_size * 500, 500 * 8)
    with MatmulCounter() as counter:
        eager_loss(hidden, weight, None, labels).backward()
    assert counter.largest_output == 4 * 64 * 500  # eager materializes all logits


def test_untrained_rows_cost_no_flops() -> None:
    hidden, weight, _, labels = fused_inputs(seed=8, masked_fraction=0.0)
    labels[0] = -100  # half the batch is prompt
    with MatmulCounter() as counter:
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3).backward()
    assert counter.matmul_flops == 3 * 2 * (SEQ - 1) * HIDDEN * VOCAB


def test_bfloat16_inputs_give_a_float32_loss() -> None:
    hidden, weight, bias, labels = fused_inputs(seed=9, dtype=torch.bfloat16, with_bias=True)
    loss, grads = loss_and_grads(fused_loss, hidden, weight, bias, labels, chunk_size=5, z_loss=1e-3)
    expected, expected_grads = loss_and_grads(eager_loss, hidden, weight, bias, labels, z_loss=1e-3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)  # the same bfloat16 logits, float32 math
    for grad, expected_grad, tensor in zip(grads, expected_grads, (hidden, weight, bias), strict=True):
        assert grad.dtype == tensor.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2e-2, atol=2e-3)


def test_weight_gradient_accumulates_in_float32() -> None:
    # 2048 trained rows of bfloat16 gradients: summed in bfloat16 the result would drift by ~1e-2.
    hidden, weight, _, labels = fused_inputs(
        seed=10, batch=1, seq=2049, masked_fraction=0.0, dtype=torch.bfloat16
    )
    fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", chunk_size=64).backward()
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    logits = (hidden32 @ weight32.T).bfloat16().float()
    causal_lm_loss(logits, labels, reduction="sum").backward()
    error = (weight.grad.float() - weight32.grad).abs().max() / weight32.grad.abs().max()
    assert error < 8e-3  # one bfloat16 rounding of the result (2^-8 = 3.9e-3 relative)


def test_accuracy_counts_argmax_hits_chunk_by_chunk() -> None:
    hidden, weight, _, labels = fused_inputs(seed=11, batch=3, seq=20, masked_fraction=0.0)
    predicted_next = (hidden @ weight.T).argmax(-1)  # [batch, seq]: the prediction for position t + 1
    # Every odd position's token is the model's prediction, so the count is neither 0 nor all.
    labels[:, 1::2] = predicted_next[:, 0::2]
    labels[:, 5] = -100
    loss, correct = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=7, return_correct=True)
    expected = count_correct_tokens(hidden @ weight.T, labels)
    assert correct.dtype == torch.int64 and correct.dim() == 0
    assert int(correct) == int(expected)
    assert 3 * 9 <= int(correct) < 3 * 19
    torch.testing.assert_close(loss, fused_linear_cross_entropy(hidden, weight, labels))
    loss.backward()  # the count does not get in the way of autograd
    assert hidden.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [True, False])
def test_return_correct_changes_nothing_but_adds_the_count(reduction: str, shift: bool) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=15, batch=3, seq=20, with_bias=True)
    predicted = (hidden @ weight.T + bias).argmax(-1)
    labels[:, 1::3] = predicted[:, 0:-1:3] if shift else predicted[:, 1::3]  # some hits, not all
    options = {"bias": bias, "reduction": reduction, "shift": shift, "z_loss": 1e-3, "chunk_size": 7}

    loss = fused_linear_cross_entropy(hidden, weight, labels, **options)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight, bias))
    loss_too, correct = fused_linear_cross_entropy(hidden, weight, labels, return_correct=True, **options)
    grads_too = torch.autograd.grad((loss_too * upstream).sum(), (hidden, weight, bias))

    assert torch.equal(loss_too, loss)  # the same computation, bit for bit
    for grad, grad_too in zip(grads, grads_too, strict=True):
        assert torch.equal(grad_too, grad)
    expected = count_correct_tokens(hidden @ weight.T + bias, labels, shift=shift)
    assert correct.dtype == torch.int64 and correct.dim() == 0 and not correct.requires_grad
    assert int(correct) == int(expected) > 0


def test_no_grad_mode_computes_only_the_loss() -> None:
    hidden, weight, _, labels = fused_inputs(seed=12)
    with torch.no_grad(), MatmulCounter() as counter:
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    assert counter.matmul_flops == 2 * trained_token_count(labels) * HIDDEN * VOCAB
    torch.testing.assert_close(loss, eager_loss(hidden, weight, None, labels))


def test_second_backward_raises() -> None:
    hidden, weight, _, labels = fused_inputs(seed=13)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_bad_input_raises_value_error_naming_the_problem() -> None:
    hidden, weight, _, labels = fused_inputs(seed=14)
    bad = labels.clone()
    bad[1, 4] = VOCAB
    with pytest.raises(ValueError, match=r"label 37 at position \(1, 3\)"):  # reported after the shift
        fused_linear_cross_entropy(hidden, weight, bad)
    bad[1, 4] = -5
    with pytest.raises(ValueError, match="label -5"):
        fused_linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match=r"labels shape \(2, 8\)"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match=r"weight must be \[vocab, hidden\]"):
        fused_linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match=r"bias must be \[vocab\]"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(VOCAB + 1))
    with pytest.raises(ValueError, match="same dtype"):
        fused_linear_cross_entropy(hidden.double(), weight, labels)
    with pytest.raises(ValueError, match="integer"):
        fused_linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


def test_default_chunk_size_keeps_chunks_even_and_under_budget() -> None:
    assert default_chunk_size(0, 32000, 1024) == 1
    assert default_chunk_size(100, 32000, 1024) == 100  # fits in one chunk
    # Half the 125 MiB weight gradient -> 512 rows of float32 logits.
    assert default_chunk_size(4096, 32000, 1024) == 512
    assert default_chunk_size(4000, 32000, 1024) == 500  # 8 even chunks, not 7 x 512 + 416
    # Half the 1002 MiB weight gradient is over the 256 MiB cap -> 523 rows: 4 chunks of 512.
    assert default_chunk_size(2048, 128256, 2048) == 512
    assert default_chunk_size(8192, 128256, 4096) == 512  # the 256 MiB cap -> 523 rows: 16 chunks of 512
    assert default_chunk_size(10_000, 10**7, 8) == 64  # never fewer than 64 rows per chunk
    # A frozen head allocates no weight gradient: a quarter of its size, 256 rows.
    assert default_chunk_size(4096, 32000, 1024, trainable_head=False) == 256


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 12),
    hidden_size=st.integers(1, 12),
    vocab=st.integers(2, 40),
    masked_fraction=st.floats(0.0, 1.0),
    chunk_size=st.integers(1, 20),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_property_equals_eager(
    batch, seq, hidden_size, vocab, masked_fraction, chunk_size, reduction, label_smoothing, z_loss, seed
) -> None:
    hidden, weight, bias, labels = fused_inputs(
        seed, batch=batch, seq=seq, hidden_size=hidden_size, vocab=vocab, masked_fraction=masked_fraction
    )
    assert_matches_eager(
        hidden,
        weight,
        bias,
        labels,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_size=chunk_size,
    )
