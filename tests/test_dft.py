"""loss_type="dft": each token's cross-entropy times its detached target probability (TRL's formula), in the
eager and the fused loss, with the normalization unchanged (hf_shift_loss/loss/weighting.py)."""

from __future__ import annotations

import pytest
import torch

from hf_shift_loss.loss import causal_lm_loss, fused_linear_cross_entropy


def batch(seed=0, vocab=40, hidden=12):
    generator = torch.Generator().manual_seed(seed)
    h = (torch.randn(3, 9, hidden, generator=generator) * 0.3).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (3, 9), generator=generator)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    return h, w, labels


def trl_dft_loss(logits, labels):
    """TRL 1.16's SFTTrainer.compute_loss for loss_type="dft", written out: -log p * p.detach(), / tokens."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    target_log_probs = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    per_token_loss = -target_log_probs * target_log_probs.exp().detach()
    return per_token_loss.sum() / mask.sum().clamp(min=1)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_eager_dft_is_trls_formula():
    h, w, labels = batch()
    ours = causal_lm_loss(h @ w.T, labels, loss_type="dft")
    theirs = trl_dft_loss(h @ w.T, labels)
    torch.testing.assert_close(ours, theirs)
    for mine, trl in zip(grads(ours, h, w), grads(theirs, h, w), strict=True):
        torch.testing.assert_close(mine, trl)
    assert not torch.allclose(ours, causal_lm_loss(h @ w.T, labels))  # it is not the plain loss


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_dft_equals_eager(sync_free, reduction):
    h, w, labels = batch(1)
    eager = causal_lm_loss(h @ w.T, labels, loss_type="dft", reduction=reduction)
    fused = fused_linear_cross_entropy(
        h, w, labels, loss_type="dft", reduction=reduction, chunk_size=4, sync_free=sync_free
    )
    torch.testing.assert_close(fused, eager)
    upstream = torch.rand_like(eager) if reduction == "none" else torch.tensor(1.0)
    for f, e in zip(
        grads((fused * upstream).sum(), h, w), grads((eager * upstream).sum(), h, w), strict=True
    ):
        torch.testing.assert_close(f, e)


@pytest.mark.parametrize("fused", [False, True])
def test_dft_is_exact_under_accumulation(fused):
    """Micro-batches each divided by the step's trained tokens add up to the whole batch's loss and gradient."""
    h, w, labels = batch(2)

    def loss(rows, num_items_in_batch=None):
        if fused:
            return fused_linear_cross_entropy(
                h[rows], w, labels[rows], loss_type="dft", num_items_in_batch=num_items_in_batch
            )
        return causal_lm_loss(
            h[rows] @ w.T, labels[rows], loss_type="dft", num_items_in_batch=num_items_in_batch
        )

    whole = loss(slice(None))
    count = (labels[:, 1:] != -100).sum()
    parts = loss(slice(0, 1), count) + loss(slice(1, 3), count)
    torch.testing.assert_close(parts, whole)
    for p, g in zip(grads(parts, h, w), grads(whole, h, w), strict=True):
        torch.testing.assert_close(p, g)


def test_dft_refuses_label_smoothing_and_z_loss():
    h, w, labels = batch()
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        causal_lm_loss(h @ w.T, labels, loss_type="dft", label_smoothing=0.1)
    with pytest.raises(ValueError, match="z_loss=0.001"):
        fused_linear_cross_entropy(h, w, labels, loss_type="dft", z_loss=1e-3)
    with pytest.raises(ValueError, match="loss_type must be 'nll' or 'dft', got 'focal'"):
        causal_lm_loss(h @ w.T, labels, loss_type="focal")
