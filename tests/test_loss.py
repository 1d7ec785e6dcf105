"""causal_lm_loss: the article's numbers, the article's formulation, the model's own loss, edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_shift_loss import causal_lm_loss, fused_linear_cross_entropy
from hf_shift_loss.loss import count_correct_tokens, count_trained_tokens, shift_labels

ARTICLE_LOGITS = [[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]]
ARTICLE_LABELS = [0, -100, 2]


def article_formulation(logits, labels):
    """The article's (and transformers 4's) slice-contiguous-view formulation, as a reference."""
    shift_logits = logits[..., :-1, :].contiguous()
    shifted = labels[..., 1:].contiguous()
    vocab_size = logits.shape[-1]
    return torch.nn.CrossEntropyLoss()(shift_logits.view(-1, vocab_size).float(), shifted.view(-1))


def test_article_mean_without_shift():
    loss = causal_lm_loss(torch.tensor(ARTICLE_LOGITS), torch.tensor(ARTICLE_LABELS), shift=False)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.51058030, abs=1e-7)


def test_article_none_without_shift():
    losses = causal_lm_loss(
        torch.tensor(ARTICLE_LOGITS), torch.tensor(ARTICLE_LABELS), shift=False, reduction="none"
    )
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.tensor([0.4170, 0.0000, 0.6041]), atol=1e-4, rtol=0)
    # Independent check of the first value: -log softmax([2, 1, 0.1])[0].
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.0) + math.exp(0.1)))
    assert losses[0].item() == pytest.approx(expected, abs=1e-6)


def test_article_sum_and_num_items_in_batch():
    logits, labels = torch.tensor(ARTICLE_LOGITS), torch.tensor(ARTICLE_LABELS)
    total = causal_lm_loss(logits, labels, shift=False, reduction="sum")
    assert total.item() == pytest.approx(2 * 0.51058030, abs=1e-6)
    # Normalized by the whole step's token count (here 4), not by the 2 tokens of this micro-batch.
    assert causal_lm_loss(logits, labels, shift=False, num_items_in_batch=4).item() == pytest.approx(
        0.51058030 / 2, abs=1e-6
    )
    assert causal_lm_loss(
        logits, labels, shift=False, num_items_in_batch=torch.tensor(4)
    ).item() == pytest.approx(0.51058030 / 2, abs=1e-6)


def test_shift_labels_pads_right_and_drops_first():
    labels = torch.tensor([[5, 6, -100, 7]])
    assert shift_labels(labels).tolist() == [[6, -100, 7, -100]]
    assert count_trained_tokens(labels).item() == 2  # 6 and 7; 5 is never a target
    assert count_trained_tokens(labels, shift=False).item() == 3


def random_batch(batch=3, seq=7, vocab=11, seed=0, masked=0.4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < masked] = -100
    return logits, labels


def test_equals_article_formulation_value_and_gradient():
    logits, labels = random_batch()
    ours_input = logits.clone().requires_grad_(True)
    reference_input = logits.clone().requires_grad_(True)
    ours = causal_lm_loss(ours_input, labels)
    reference = article_formulation(reference_input, labels)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_input.grad, reference_input.grad, rtol=1e-6, atol=1e-8)


def test_equals_model_own_loss():
    model = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    outputs = model(input_ids=input_ids, labels=labels)
    ours = causal_lm_loss(outputs.logits, labels)
    torch.testing.assert_close(ours, outputs.loss, rtol=1e-6, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours, model.lm_head.weight, retain_graph=True)
    (grad_model,) = torch.autograd.grad(outputs.loss, model.lm_head.weight)
    torch.testing.assert_close(grad_ours, grad_model, rtol=1e-5, atol=1e-7)


def test_no_logits_copy_the_shift_is_on_labels():
    # The article's formulation makes a [batch, seq-1, vocab] copy; ours reads the logits in place,
    # so a view of non-contiguous logits still works and the loss matches.
    logits, labels = random_batch(seq=6)
    transposed = logits.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous view
    torch.testing.assert_close(causal_lm_loss(transposed, labels), article_formulation(logits, labels))


def test_reduction_none_has_labels_shape_and_zero_where_untrained():
    logits, labels = random_batch()
    losses = causal_lm_loss(logits, labels, reduction="none")
    assert losses.shape == labels.shape
    targets = shift_labels(labels)
    assert torch.all(losses[targets == -100] == 0)
    assert torch.all(losses[targets != -100] > 0)
    torch.testing.assert_close(losses.sum() / (targets != -100).sum(), causal_lm_loss(logits, labels))


def test_label_smoothing_matches_torch():
    logits, labels = random_batch()
    targets = shift_labels(labels).reshape(-1)
    expected = F.cross_entropy(logits.reshape(-1, 11), targets, label_smoothing=0.1)
    torch.testing.assert_close(causal_lm_loss(logits, labels, label_smoothing=0.1), expected)


def test_z_loss_adds_weighted_squared_logsumexp_over_trained_tokens():
    logits, labels = random_batch()
    targets = shift_labels(labels).reshape(-1)
    trained = targets != -100
    flat = logits.reshape(-1, 11)
    expected = F.cross_entropy(flat, targets) + 1e-2 * torch.logsumexp(flat[trained], -1).square().mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels, z_loss=1e-2), expected)


def test_no_trained_token_gives_zero_with_a_graph_not_nan():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # position 0 is never a target after the shift
    for reduction in ("mean", "sum"):
        loss = causal_lm_loss(logits, labels, reduction=reduction)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad == 0)
    assert causal_lm_loss(logits, labels, num_items_in_batch=0).item() == 0.0


def test_bfloat16_logits_give_float32_loss():
    logits, labels = random_batch(dtype=torch.bfloat16)
    loss = causal_lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    reference = causal_lm_loss(logits.float(), labels)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


def test_shape_mismatch_raises_naming_shapes():
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\) does not match logits shape \(2, 5, 7\)"):
        causal_lm_loss(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("bad", [7, 100, -1, -5])
def test_label_out_of_vocab_raises_naming_position(bad):
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 3] = bad
    # After the shift, label [1, 3] is the target of position [1, 2].
    with pytest.raises(ValueError, match=rf"label {bad} at position \(1, 2\)"):
        causal_lm_loss(torch.randn(2, 5, 7), labels)


def test_bad_options_raise():
    logits, labels = random_batch()
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        causal_lm_loss(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        causal_lm_loss(logits, labels, z_loss=-1.0)


def test_count_correct_tokens():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = 1  # predicts 2, target 2 -> correct
    logits[0, 1, 3] = 1  # predicts 3, target 4 -> wrong
    logits[0, 2, 1] = 1  # target ignored
    labels = torch.tensor([[0, 2, 4, -100]])
    assert count_correct_tokens(logits, labels).item() == 1


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(2, 9),
    vocab=st.integers(2, 13),
    masked=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    split=st.integers(1, 3),
)
def test_property_sum_is_additive_over_any_batch_split(batch, seq, vocab, masked, seed, split):
    """Summing per-part sums over any split of the batch, divided by the total count, is the mean."""
    logits, labels = random_batch(batch, seq, vocab, seed, masked)
    whole = causal_lm_loss(logits, labels, reduction="sum")
    parts = sum(
        causal_lm_loss(logits[i : i + split], labels[i : i + split], reduction="sum")
        for i in range(0, batch, split)
    )
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    count = count_trained_tokens(labels)
    mean = causal_lm_loss(logits, labels)
    if count > 0:
        torch.testing.assert_close(mean, whole / count, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean, article_formulation(logits, labels), rtol=1e-5, atol=1e-6)
    else:
        assert mean.item() == 0.0


def test_z_loss_with_label_smoothing_value_and_gradient_match_the_definition():
    logits, labels = random_batch(seed=3)
    logits.requires_grad_(True)
    targets = shift_labels(labels).reshape(-1)
    trained = targets != -100
    flat = logits.reshape(-1, 11)
    reference = (
        F.cross_entropy(flat, targets, label_smoothing=0.2, reduction="sum")
        + 1e-2 * torch.logsumexp(flat[trained], -1).square().sum()
    ) / trained.sum()
    ours = causal_lm_loss(logits, labels, label_smoothing=0.2, z_loss=1e-2)
    torch.testing.assert_close(ours, reference)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad_ours, grad_reference)
    none = causal_lm_loss(logits, labels, label_smoothing=0.2, z_loss=1e-2, reduction="none")
    assert torch.all(none.reshape(-1)[~trained] == 0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_any_integer_label_dtype_gives_the_same_loss_eager_and_fused(dtype):
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.tensor([[-100, 3, 4, 10, 0], [-100, -100, 7, 1, 2]])
    labels = labels if dtype != torch.uint8 else labels.clamp(min=0)  # uint8 cannot hold -100
    expected = causal_lm_loss(hidden @ weight.T, labels)
    assert torch.equal(causal_lm_loss(hidden @ weight.T, labels.to(dtype)), expected)
    fused = fused_linear_cross_entropy(hidden, weight, labels.to(dtype))
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_non_integer_labels_get_the_same_value_error_eager_and_fused(dtype):
    hidden, weight = torch.randn(1, 4, 8), torch.randn(11, 8)
    labels = torch.tensor([[0, 1, 2, 3]]).to(dtype)
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        causal_lm_loss(hidden @ weight.T, labels)
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        fused_linear_cross_entropy(hidden, weight, labels)
