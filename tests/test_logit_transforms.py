"""Heads that transform their logits: soft-capping (Gemma 2) and scales (Cohere, Granite), fused and eager.

The fused loss reads the transform from the config as the model applies it, applies it inside each
chunk and back-propagates through it exactly: the trainer's eager loss, its fused loss and the model's
own loss agree on values (1e-5) and gradients (1e-4).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from hf_shift_loss import causal_lm_loss, fused_linear_cross_entropy
from hf_shift_loss.heads import get_output_head
from hf_shift_loss.loss_paths import EagerLoss, FusedLoss, choose_loss_path

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _gemma2() -> torch.nn.Module:
    # A small cap, so that tanh bites: random logits reach |x| ~ 3 here.
    return Gemma2ForCausalLM(
        Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=1.5, attn_logit_softcapping=None)
    )


def _cohere() -> torch.nn.Module:
    return CohereForCausalLM(CohereConfig(**COMMON, logit_scale=0.25, tie_word_embeddings=True))


def _granite() -> torch.nn.Module:
    return GraniteForCausalLM(GraniteConfig(**COMMON, logits_scaling=4.0))


MODELS = {
    "gemma2-softcap": (_gemma2, 1.0, 1.5),
    "cohere-scale": (_cohere, 0.25, None),
    "granite-scale": (_granite, 0.25, None),
}


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_transform_is_read_from_the_config_as_the_model_applies_it(name):
    build, scale, softcap = MODELS[name]
    torch.manual_seed(0)
    head = get_output_head(build())
    assert head.logit_scale == pytest.approx(scale) and head.logit_softcap == softcap


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eager_fused_and_the_models_own_loss_agree(name):
    build = MODELS[name][0]
    torch.manual_seed(0)
    model = build().train()
    batch = _batch()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    options = dict(shift=True, reduction="mean", num_items_in_batch=None, count_correct=True)
    results = {}
    for label in ("own", "eager", "fused"):
        trained = copy.deepcopy(model)
        if label == "own":
            loss = trained(**batch).loss
        else:
            path = EagerLoss() if label == "eager" else choose_loss_path(trained, "fused")
            loss = path(trained, inputs, batch["labels"], **options).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None}
        results[label] = (loss.detach(), grads)
    assert isinstance(choose_loss_path(model, "fused"), FusedLoss)
    own_loss, own_grads = results["own"]
    for label in ("eager", "fused"):
        loss, grads = results[label]
        torch.testing.assert_close(loss, own_loss, rtol=1e-5, atol=1e-6, msg=label)
        assert grads.keys() == own_grads.keys()
        for parameter, grad in own_grads.items():
            torch.testing.assert_close(
                grads[parameter], grad, rtol=1e-4, atol=1e-6, msg=f"{label} {parameter}"
            )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("scale", "softcap"), [(1.0, 2.0), (0.3, None), (3.0, None), (1.0, 0.7)])
def test_the_fused_kernel_matches_causal_lm_loss_with_the_same_transform(reduction, scale, softcap):
    torch.manual_seed(1)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    labels = torch.randint(0, 40, (3, 9))
    labels[0, :5] = -100
    options = dict(
        reduction=reduction, logit_scale=scale, logit_softcap=softcap, label_smoothing=0.1, z_loss=1e-3
    )
    expected = causal_lm_loss(hidden @ weight.T + bias, labels, **options)
    fused = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=5, **options)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    fused_grads = torch.autograd.grad((fused * upstream).sum(), (hidden, weight, bias))
    for got, want in zip(fused_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The transform changes the loss (the test would pass trivially otherwise).
    assert not torch.allclose(expected, causal_lm_loss(hidden @ weight.T + bias, labels, reduction=reduction))


def _docs_fused_loss_example() -> str:
    """The first code block of docs/fused-loss.md: how the docs teach running the fused loss on a model."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "fused-loss.md").read_text(encoding="utf-8")
    return re.search(r"^```python\n(.*?)^```$", page, flags=re.MULTILINE | re.DOTALL)[1]


def test_the_docs_fused_loss_example_is_the_models_own_loss_on_a_soft_capped_head():
    torch.manual_seed(0)
    model = _gemma2().train()
    with torch.no_grad():  # logits of a few units, so that the cap (1.5) changes the loss visibly
        model.get_output_embeddings().weight.mul_(10.0)
    own = copy.deepcopy(model)
    batch = _batch()
    expected = own(**batch).loss
    expected.backward()

    namespace = {"model": model, "batch": batch}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(_docs_fused_loss_example(), "docs/fused-loss.md", "exec"), namespace)
    path = namespace["path"]
    assert isinstance(path, FusedLoss) and path.head.logit_softcap == 1.5
    assert printed.getvalue() == "fused None\ntorch.int64\n"
    torch.testing.assert_close(namespace["result"].loss, expected, rtol=1e-5, atol=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}  # its backward()
    own_grads = {name: p.grad for name, p in own.named_parameters() if p.grad is not None}
    assert grads.keys() == own_grads.keys() and grads
    for name, grad in own_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Control: the head without its soft-cap (what the docs taught before) computes another loss.
    uncapped = FusedLoss(dataclasses.replace(path.head, logit_softcap=None))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    assert not torch.allclose(uncapped(model, inputs, batch["labels"]).loss, expected, rtol=1e-3)


def test_bad_transforms_are_refused():
    hidden, weight, labels = torch.randn(1, 3, 4), torch.randn(5, 4), torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="logit_scale must be a positive finite number"):
        fused_linear_cross_entropy(hidden, weight, labels, logit_scale=0.0)
    with pytest.raises(ValueError, match="logit_softcap must be a positive finite number or None"):
        causal_lm_loss(hidden @ weight.T, labels, logit_softcap=-1.0)
