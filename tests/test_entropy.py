"""The logged entropy: the fused loss sums it per chunk, inside the kernel, equal to the eager pass over the logits."""

from __future__ import annotations

import pytest
import torch

from hf_shift_loss.loss import fused_linear_cross_entropy
from hf_shift_loss.loss.predictions import sum_token_entropy


@pytest.mark.parametrize("sync_free", [False, True])
def test_fused_entropy_equals_the_entropy_of_the_full_logits(sync_free):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 8, generator=generator, requires_grad=True)
    weight = torch.randn(33, 8, generator=generator) * 3  # peaked rows: some exp underflow to 0
    labels = torch.randint(0, 33, (2, 7), generator=generator)
    labels[:, :3] = -100
    logits = hidden @ weight.T
    probabilities = torch.softmax(logits.detach()[:, :-1], dim=-1)
    by_hand = (
        -(probabilities * probabilities.log().nan_to_num(neginf=0.0)).sum(-1)[labels[:, 1:] != -100].sum()
    )
    torch.testing.assert_close(sum_token_entropy(logits, labels), by_hand)
    loss, correct, entropy = fused_linear_cross_entropy(
        hidden, weight, labels, chunk_size=3, return_correct=True, return_entropy=True, sync_free=sync_free
    )
    torch.testing.assert_close(entropy, by_hand)
    loss_only = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3, sync_free=sync_free)
    torch.testing.assert_close(loss, loss_only)
    just_entropy = fused_linear_cross_entropy(
        hidden, weight, labels, return_entropy=True, sync_free=sync_free
    )
    torch.testing.assert_close(just_entropy[1], by_hand)
    loss.backward()  # the entropy is a metric: no gradient flows through it
    assert not entropy.requires_grad


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 5, 14])
def test_eager_entropy_in_row_chunks_equals_one_pass(monkeypatch, rows_per_chunk):
    """The eager entropy runs in row chunks (bounded temporaries): any chunking, incl. a ragged last chunk
    and chunks that straddle two sequences, sums the same trained positions as one pass."""
    from hf_shift_loss.loss import predictions

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 11, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 7), generator=generator)
    labels[0, :4] = -100
    log_probs = torch.log_softmax(logits.float()[:, :-1], dim=-1)
    by_hand = -(log_probs.exp() * log_probs).sum(-1)[labels[:, 1:] != -100].sum()
    monkeypatch.setattr(predictions, "ENTROPY_CHUNK_ELEMENTS", 11 * rows_per_chunk)
    torch.testing.assert_close(sum_token_entropy(logits, labels), by_hand)
