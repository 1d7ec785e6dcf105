"""The fused loss path gives each model's own loss and gradients, or the model is refused with a reason."""

from __future__ import annotations

import helpers
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

import hf_shift_loss.loss.paths as loss_paths
from hf_shift_loss.loss import (
    EagerLoss,
    FusedLoss,
    UnsupportedOutputHead,
    choose_loss_path,
    count_correct_tokens,
    fused_linear_cross_entropy,
    get_output_head,
)
from hf_shift_loss.loss.heads import lm_head_returns_hidden_states

VOCAB = 101


def tiny_llama(tie_word_embeddings: bool = False, seed: int = 0) -> LlamaForCausalLM:
    return helpers.tiny_llama(VOCAB, seed=seed, tie_word_embeddings=tie_word_embeddings)


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def without_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key != "labels"}


def fused_path(model: nn.Module, chunk_size: int) -> FusedLoss:
    path = choose_loss_path(model, "fused", chunk_size=chunk_size)
    assert isinstance(path, FusedLoss), path.reason
    return path


def fused_model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return fused_path(model, chunk_size=5)(model, without_labels(batch), batch["labels"]).loss


def refusal(model: nn.Module) -> str | None:
    """Why the fused path falls back to eager for ``model`` (None: it fuses)."""
    path = choose_loss_path(model, "fused")
    return path.reason if isinstance(path, EagerLoss) else None


def trainable_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def assert_same_loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = model(**batch).loss
    expected_grads = trainable_grads(model, expected)
    loss = fused_model_loss(model, batch)
    grads = trainable_grads(model, loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return grads


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_llama_fused_equals_model_loss(tie_word_embeddings: bool) -> None:
    model = tiny_llama(tie_word_embeddings)
    head = fused_path(model, chunk_size=5).head  # the path owns the head
    assert head.lm_head is model.lm_head
    assert head.weight is model.lm_head.weight and head.bias is None
    assert (head.weight is model.model.embed_tokens.weight) == tie_word_embeddings
    grads = assert_same_loss_and_grads(model, make_batch())
    assert "lm_head.weight" in grads or tie_word_embeddings


def test_lora_with_frozen_head() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    head = get_output_head(model)
    assert not head.weight.requires_grad
    grads = assert_same_loss_and_grads(model, make_batch(1))
    assert grads and all("lora_" in name for name in grads)


def test_lora_with_head_in_modules_to_save_uses_the_trained_copy() -> None:
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False
        ),
    )
    wrapper = model.get_output_embeddings()
    trained_copy = wrapper.modules_to_save["default"]
    with torch.no_grad():  # make the copy differ from the original, so that using the wrong one fails
        trained_copy.weight.add_(torch.randn_like(trained_copy.weight))
    head = get_output_head(model)
    assert head.lm_head is trained_copy and head.weight is trained_copy.weight
    grads = assert_same_loss_and_grads(model, make_batch(2))
    assert any("modules_to_save" in name and "lm_head" in name for name in grads)

    with model.disable_adapter():  # the base model's head is used again, as in the model's forward
        assert head.lm_head is wrapper.original_module


def test_lora_targeting_the_head_is_refused() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "bypass the adapter" in refusal(model)
    with pytest.raises(UnsupportedOutputHead, match="bypass the adapter"):
        get_output_head(model)


def test_prompt_learning_is_refused() -> None:
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(UnsupportedOutputHead, match="prompt-learning"):
        get_output_head(model)


class NoHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_models_the_fused_loss_cannot_reproduce_are_refused() -> None:
    with pytest.raises(UnsupportedOutputHead, match="no get_output_embeddings"):
        get_output_head(NoHead())

    model = tiny_llama()
    model.lm_head = nn.Sequential(nn.Linear(32, VOCAB))
    with pytest.raises(UnsupportedOutputHead, match="not a plain torch.nn.Linear"):
        get_output_head(model)
    model.lm_head = ScaledLinear(32, VOCAB)
    assert "not a plain torch.nn.Linear" in refusal(model)


@pytest.mark.parametrize("attribute", ["logit_scale", "logits_scaling", "lm_head_multiplier"])
def test_logit_scaling_is_refused(attribute: str) -> None:
    model = tiny_llama()
    setattr(model.config, attribute, 1.0)  # 1 changes nothing
    assert refusal(model) is None
    setattr(model.config, attribute, 0.5)
    with pytest.raises(UnsupportedOutputHead, match=rf"scales its logits \(config.{attribute}=0.5\)"):
        get_output_head(model)


def test_hidden_states_move_to_the_head_device(monkeypatch) -> None:
    model = tiny_llama()
    path = fused_path(model, chunk_size=5)
    model.lm_head.to("meta")  # stands for a head on another device (model parallel)
    received = {}

    def record(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **options) -> torch.Tensor:
        received["hidden"] = hidden
        return hidden.new_zeros(())

    monkeypatch.setattr(loss_paths, "fused_linear_cross_entropy", record)
    batch = make_batch()
    path(model, without_labels(batch), batch["labels"])
    hidden = received["hidden"]
    assert hidden.device.type == "meta" and hidden.shape == (2, 12, 32)


def test_lm_head_returns_hidden_states_inside_the_block() -> None:
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    )
    batch = make_batch(3)
    head = get_output_head(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with lm_head_returns_hidden_states(head) as recorded:
        model(**inputs)
    hidden = recorded.hidden
    decoder = model.get_base_model().get_decoder()
    torch.testing.assert_close(hidden, decoder(**inputs, use_cache=False).last_hidden_state)
    assert model(**inputs).logits.shape == (2, 12, VOCAB)  # restored
    loss = fused_linear_cross_entropy(hidden, head.weight, batch["labels"])
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_accuracy_matches_the_model_logits() -> None:
    model = tiny_llama(seed=4)
    batch = make_batch(4)
    # Targets = the model's own predictions at half of the positions, so the count is not 0.
    predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(
        -1
    )
    batch["labels"][:, 5::2] = predictions[:, 4:-1:2]
    path = fused_path(model, chunk_size=4)
    correct = path(model, without_labels(batch), batch["labels"], count_correct=True).correct_tokens
    expected = count_correct_tokens(model(**batch).logits, batch["labels"])
    assert int(correct) == int(expected) >= 4
