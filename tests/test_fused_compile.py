"""fused_linear_cross_entropy(..., sync_free=True): the default mode's results, fixed shapes, no host sync.

The equality tests are fast; one test (marked slow) compiles a loss function with
torch.compile(fullgraph=True) and checks forward and backward against eager.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED_SHAPE, MatmulCounter, fused_inputs

from hf_shift_loss.fused import fused_linear_cross_entropy

BATCH, SEQ, HIDDEN, VOCAB = FUSED_SHAPE


def run(hidden, weight, bias, labels, upstream=None, **options):
    """(loss, correct or None, grads wrt the inputs that require grad) of one forward+backward."""
    out = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **options)
    loss, correct = out if options.get("return_correct") else (out, None)
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    weighted = loss if upstream is None else (loss * upstream).sum()
    return loss.detach(), correct, torch.autograd.grad(weighted, inputs)


def assert_sync_free_matches(
    hidden, weight, bias, labels, *, rtol: float = 1e-5, grad_rtol: float = 1e-4, **options
) -> None:
    shape = labels.shape if options.get("reduction") == "none" else ()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1)) if shape else None
    loss, correct, grads = run(hidden, weight, bias, labels, upstream, sync_free=True, **options)
    expected, expected_correct, expected_grads = run(hidden, weight, bias, labels, upstream, **options)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=rtol * 0.1)
    if options.get("return_correct"):
        assert correct.dtype == torch.int64 and correct.dim() == 0 and not correct.requires_grad
        assert int(correct) == int(expected_correct)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == expected_grad.dtype
        torch.testing.assert_close(grad, expected_grad, rtol=grad_rtol, atol=grad_rtol * 1e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_default_mode(
    reduction: str, label_smoothing: float, z_loss: float, with_bias: bool
) -> None:
    hidden, weight, bias, labels = fused_inputs(with_bias=with_bias)
    options = {"reduction": reduction, "label_smoothing": label_smoothing, "z_loss": z_loss, "chunk_size": 5}
    assert_sync_free_matches(hidden, weight, bias, labels, return_correct=True, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("logit_scale", "logit_softcap"), [(0.5, None), (1.0, 3.0), (2.0, 5.0)])
def test_scaled_and_soft_capped_heads(
    reduction: str, logit_scale: float, logit_softcap: float | None
) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=1, with_bias=True)
    options = {"logit_scale": logit_scale, "logit_softcap": logit_softcap, "z_loss": 1e-3}
    assert_sync_free_matches(hidden, weight, bias, labels, reduction=reduction, chunk_size=4, **options)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 18, 64, None])
@pytest.mark.parametrize("num_items_in_batch", [None, 40.0, torch.tensor(23)])
def test_any_chunk_size_and_denominator(chunk_size: int | None, num_items_in_batch) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=2, with_bias=True)
    assert_sync_free_matches(
        hidden, weight, bias, labels, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch
    )


@pytest.mark.parametrize("shift", [True, False])
def test_shift_and_flat_tokens(shift: bool) -> None:
    hidden, weight, _, labels = fused_inputs(seed=3)
    assert_sync_free_matches(hidden, weight, None, labels, shift=shift, chunk_size=6, return_correct=True)
    flat_hidden = hidden.detach()[0].requires_grad_()
    assert_sync_free_matches(flat_hidden, weight, None, labels[0], shift=shift, chunk_size=6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight(reduction: str) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=4, with_bias=True)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    assert_sync_free_matches(hidden, weight, bias, labels, reduction=reduction, chunk_size=5)
    with MatmulCounter() as counter:
        fused_linear_cross_entropy(hidden, weight, labels, sync_free=True, chunk_size=5).backward()
    assert counter.matmul_flops == 2 * 2 * BATCH * SEQ * HIDDEN * VOCAB  # logits + hidden gradient, all rows
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bfloat16(reduction: str) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=5, with_bias=True, dtype=torch.bfloat16)
    options = {"reduction": reduction, "z_loss": 1e-3, "logit_softcap": 4.0, "return_correct": True}
    # The same bfloat16 logits and float32 loss math; the gradients are rounded to bfloat16 once.
    assert_sync_free_matches(hidden, weight, bias, labels, rtol=1e-5, grad_rtol=2e-2, chunk_size=5, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_is_zero_loss_and_zero_grads(reduction: str) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=6, with_bias=True)
    labels[:, 1:] = -100  # only the first column is trained, and the shift drops it
    loss, correct = fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, reduction=reduction, sync_free=True, return_correct=True
    )
    assert not loss.isnan().any() and (loss == 0).all() and int(correct) == 0
    loss.sum().backward()
    for tensor in (hidden, weight, bias):
        assert tensor.grad is not None and (tensor.grad == 0).all()


def test_untrained_rows_get_exactly_zero_even_from_a_nan_upstream() -> None:
    hidden, weight, _, labels = fused_inputs(seed=7)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    poisoned = upstream.masked_fill(targets == -100, float("nan"))
    losses = fused_linear_cross_entropy(
        hidden, weight, labels, reduction="none", sync_free=True, chunk_size=4
    )
    assert (losses[targets == -100] == 0).all() and (losses[targets != -100] > 0).all()
    grads = torch.autograd.grad((losses * upstream.masked_fill(targets == -100, 0.0)).sum(), (hidden, weight))
    losses = fused_linear_cross_entropy(
        hidden, weight, labels, reduction="none", sync_free=True, chunk_size=4
    )
    poisoned_grads = torch.autograd.grad(losses, (hidden, weight), grad_outputs=poisoned)
    for grad, poisoned_grad in zip(grads, poisoned_grads, strict=True):
        assert torch.equal(grad, poisoned_grad)
    assert (grads[0][targets == -100] == 0).all()


def test_out_of_range_labels_are_ignored_not_reported() -> None:
    hidden, weight, _, labels = fused_inputs(seed=8)
    bad = labels.clone()
    bad[0, 3], bad[1, 5] = VOCAB, -5  # the default mode raises ValueError for these
    ignored = bad.masked_fill((bad >= VOCAB) | ((bad < 0) & (bad != -100)), -100)
    loss, correct, grads = run(hidden, weight, None, bad, sync_free=True, return_correct=True)
    expected, expected_correct, expected_grads = run(hidden, weight, None, ignored, return_correct=True)
    torch.testing.assert_close(loss, expected)
    assert int(correct) == int(expected_correct)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
    with pytest.raises(ValueError, match="label 37"):
        fused_linear_cross_entropy(hidden, weight, bad)


def test_no_grad_mode() -> None:
    hidden, weight, _, labels = fused_inputs(seed=9)
    with torch.no_grad(), MatmulCounter() as counter:
        loss = fused_linear_cross_entropy(hidden, weight, labels, sync_free=True, chunk_size=5)
    assert counter.matmul_flops == 2 * BATCH * SEQ * HIDDEN * VOCAB
    torch.testing.assert_close(loss, fused_linear_cross_entropy(hidden, weight, labels))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_and_shapes_independent_of_the_labels(reduction: str) -> None:
    hidden, weight, bias, labels = fused_inputs(seed=10, with_bias=True, masked_fraction=0.1)
    options = {"bias": bias, "reduction": reduction, "z_loss": 1e-3, "return_correct": True, "chunk_size": 4}
    traces = []
    for masked_fraction in (0.1, 0.6, 1.0):
        labels = fused_inputs(seed=11, masked_fraction=masked_fraction)[3]
        with MatmulCounter() as counter:
            loss, _ = fused_linear_cross_entropy(hidden, weight, labels, sync_free=True, **options)
            torch.autograd.grad(loss.sum(), (hidden, weight, bias))
        traces.append(counter.ops)
    # .item(), bool(tensor), .tolist() all go through _local_scalar_dense; nonzero has a data-dependent shape.
    names = {name for name, _ in traces[0]}
    assert not names & {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique"}
    assert traces[0] == traces[1] == traces[2]  # the same ops with the same shapes, whatever is masked
    with MatmulCounter() as counter:
        fused_linear_cross_entropy(hidden, weight, labels, **options)[0].sum().backward()
    assert "nonzero" in {name for name, _ in counter.ops}  # the default mode does sync (the check works)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager() -> None:
    """One cold compile (~35 s on 2 CPU cores) of a mean and a per-token loss (3 chunks each), forward and backward."""
    torch._dynamo.reset()
    hidden, weight, bias, labels = fused_inputs(seed=12, batch=3, seq=11, with_bias=True)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    options = {"bias": bias, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 3.0, "chunk_size": 12}

    def step(hidden, weight, bias, labels, upstream):
        del bias  # in options; an argument so that the graph takes it as an input
        mean, correct = fused_linear_cross_entropy(
            hidden, weight, labels, sync_free=True, return_correct=True, **options
        )
        per_token = fused_linear_cross_entropy(
            hidden, weight, labels, sync_free=True, reduction="none", **options
        )
        return mean + (per_token * upstream).sum(), correct

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for call, masked_fraction in enumerate((0.3, 0.8)):
        labels = fused_inputs(seed=13 + call, batch=3, seq=11, masked_fraction=masked_fraction)[3]
        results = []
        for fn in (compiled, step):
            hidden.grad = weight.grad = bias.grad = None
            # Other labels must not recompile: nothing in the graph depends on their values.
            with torch._dynamo.config.patch(error_on_recompile=call > 0):
                loss, correct = fn(hidden, weight, bias, labels, upstream)
            loss.backward()
            results.append((loss.detach(), correct, hidden.grad, weight.grad, bias.grad))
        (loss, correct, *grads), (expected, expected_correct, *expected_grads) = results
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert int(correct) == int(expected_correct)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("torch_compile", "asked", "expected"), [(False, None, False), (True, None, True), (False, True, True)]
)
def test_the_trainer_uses_the_sync_free_mode_when_compiled_or_asked(tmp_path, torch_compile, asked, expected):
    from helpers import tiny_llama

    from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

    args = ShiftLossArguments(
        output_dir=str(tmp_path), loss_impl="fused", fused_sync_free=asked, report_to="none", use_cpu=True
    )
    trainer = ShiftLossTrainer(model=tiny_llama(), args=args)
    trainer.args.torch_compile = torch_compile  # as set by the user; compiling itself is not needed here
    path = trainer.loss_path(trainer.model)
    assert path.name == "fused" and path.sync_free is expected
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "labels": torch.tensor([[-100, -100, 6, 7]])}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    reference = ShiftLossTrainer(
        model=trainer.model, args=ShiftLossArguments(output_dir=str(tmp_path), loss_impl="eager")
    )
    torch.testing.assert_close(loss, reference.compute_loss(trainer.model, batch), rtol=1e-5, atol=1e-6)
