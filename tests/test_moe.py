"""MoE models: the router's load-balancing loss is added exactly as the model's own forward adds it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from hf_shift_loss import ShiftLossArguments, ShiftLossTrainer

VOCAB = 80


def _mixtral(output_router_logits: bool) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=output_router_logits,
        router_aux_loss_coef=0.05,
    )
    return MixtralForCausalLM(config).train()


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
@pytest.mark.parametrize("output_router_logits", [True, False])
def test_trainer_loss_equals_the_moe_models_own_loss(tmp_path, loss_impl, output_router_logits):
    model = _mixtral(output_router_logits)
    own = copy.deepcopy(model)
    own_loss = own(**_batch()).loss
    own_loss.backward()
    args = ShiftLossArguments(output_dir=str(tmp_path), loss_impl=loss_impl, report_to="none", use_cpu=True)
    trainer = ShiftLossTrainer(model=model, args=args)
    assert trainer.loss_path(model).name == loss_impl
    assert trainer.loss_path(model).router_aux_loss_coef == (0.05 if output_router_logits else 0.0)
    loss = trainer.compute_loss(model, _batch())
    loss.backward()
    torch.testing.assert_close(loss, own_loss, rtol=1e-5, atol=1e-6)
    own_grads = dict(own.named_parameters())
    for name, parameter in model.named_parameters():
        if own_grads[name].grad is None:
            assert parameter.grad is None or not parameter.grad.any(), name
            continue
        torch.testing.assert_close(parameter.grad, own_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    if output_router_logits:  # the router loss is really in there (the test can fail)
        without = own(**{k: v for k, v in _batch().items() if k != "labels"})
        assert without.aux_loss is not None and float(without.aux_loss) > 0
