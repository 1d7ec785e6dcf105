"""ShiftLossTrainer: exact normalization under gradient accumulation, model equivalence, peft, logs."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from helpers import make_args, tiny_llama, word_tokenizer
from peft import LoraConfig, get_peft_model

from hf_shift_loss import PromptMaskingCollator, ShiftLossTrainer, causal_lm_loss
from hf_shift_loss.loss.predictions import sum_token_entropy

# Very different trained-token counts per example: 1, 2, 11 and 4 answer tokens, each + eos.
EXAMPLES = [
    {"prompt": "where is the capital of China <sep>", "completion": "Beijing"},
    {"prompt": "who wrote this book <sep>", "completion": "I do"},
    {"prompt": "a <sep>", "completion": "it was written by a big river and a small city"},
    {"prompt": "what is the capital of France <sep>", "completion": "The capital is Paris"},
]


def train_one_step(model, tmp_path, **overrides):
    tokenizer = word_tokenizer()
    trainer = ShiftLossTrainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list(EXAMPLES),
        data_collator=PromptMaskingCollator(tokenizer),
    )
    trainer.train()
    return trainer


def global_mean_loss(model):
    """The loss of all four examples as one batch: the reference every configuration must match."""
    batch = PromptMaskingCollator(word_tokenizer())(EXAMPLES)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return causal_lm_loss(logits, batch["labels"]).item()


def parameters_after(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_one_step_is_identical_for_any_gradient_accumulation(tmp_path):
    base = tiny_llama()
    reference_loss = global_mean_loss(base)
    full_batch = PromptMaskingCollator(word_tokenizer())(EXAMPLES)
    all_input_tokens = int(full_batch["attention_mask"].sum())
    with torch.no_grad():
        logits = base(input_ids=full_batch["input_ids"], attention_mask=full_batch["attention_mask"]).logits
    reference_entropy = (sum_token_entropy(logits, full_batch["labels"]) / 22).item()
    results = {}
    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        trainer = train_one_step(
            copy.deepcopy(base),
            tmp_path / f"{batch_size}x{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        results[(batch_size, accumulation)] = parameters_after(trainer)
        logged = [entry for entry in trainer.state.log_history if "loss" in entry][0]
        # The logged loss is the global token mean of the step, not a mean of micro-batch means.
        assert logged["loss"] == pytest.approx(reference_loss, rel=1e-5)
        assert logged["trained_tokens"] == 2 + 3 + 12 + 5  # completion tokens + eos per example
        assert 0.0 <= logged["mean_token_accuracy"] <= 1.0  # TRL's names
        assert logged["num_tokens"] == all_input_tokens  # every input token of the step, padding excluded
        assert logged["entropy"] == pytest.approx(reference_entropy, rel=1e-5)  # mean over trained tokens
    for key in [(2, 2), (1, 4)]:
        for name, value in results[(4, 1)].items():
            torch.testing.assert_close(results[key][name], value, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


def test_mean_of_micro_batch_means_would_differ():
    """The naive normalization gives another gradient on this data, so the test above can fail."""
    model = tiny_llama()
    collator = PromptMaskingCollator(word_tokenizer())

    def gradient(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return model.lm_head.weight.grad.clone()

    def global_mean():
        batch = collator(EXAMPLES)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"])

    def mean_of_means():
        losses = []
        for example in EXAMPLES:
            batch = collator([example])
            losses.append(causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]))
        return sum(losses) / len(losses)

    difference = (gradient(global_mean) - gradient(mean_of_means)).abs().max()
    assert difference > 1e-3


def test_compute_loss_equals_model_own_loss(tmp_path):
    model = tiny_llama()
    trainer = ShiftLossTrainer(
        model=model, args=make_args(tmp_path), data_collator=PromptMaskingCollator(word_tokenizer())
    )
    batch = PromptMaskingCollator(word_tokenizer())(EXAMPLES)
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        theirs = model(**batch).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_peft_lora_trains_only_adapters(tmp_path):
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = train_one_step(model, tmp_path, learning_rate=1.0)
    changed = {
        name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])
    }
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][0]
    assert math.isfinite(logged["loss"])


def test_evaluate_reports_exact_token_mean_and_perplexity(tmp_path):
    model = tiny_llama()
    trainer = ShiftLossTrainer(
        model=model,
        args=make_args(tmp_path, per_device_eval_batch_size=3),  # batches of 3 and 1 examples
        eval_dataset=Dataset.from_list(EXAMPLES),
        data_collator=PromptMaskingCollator(word_tokenizer()),
    )
    metrics = trainer.evaluate()
    expected = global_mean_loss(model)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert metrics["eval_trained_tokens"] == 22


def test_label_smoothing_and_z_loss_reach_the_loss(tmp_path):
    model = tiny_llama()
    batch = PromptMaskingCollator(word_tokenizer())(EXAMPLES)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trainer = ShiftLossTrainer(
            model=model, args=make_args(tmp_path, label_smoothing_factor=0.1, z_loss=1e-3)
        )
        ours = trainer.compute_loss(model, dict(batch))
    expected = causal_lm_loss(logits, batch["labels"], label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(ours, expected)


def test_dft_one_step_is_the_same_for_any_accumulation_and_both_paths(tmp_path):
    """loss_type="dft" reaches the loss: the step's loss is the global token mean of TRL's DFT formula, and
    the update is the same with accumulation and on the fused and the eager path."""
    base = tiny_llama()
    batch = PromptMaskingCollator(word_tokenizer())(EXAMPLES)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = causal_lm_loss(logits, batch["labels"], loss_type="dft")
    assert not torch.allclose(expected, causal_lm_loss(logits, batch["labels"]))
    results = {}
    for loss_impl, batch_size, accumulation in [
        ("eager", 4, 1),
        ("fused", 4, 1),
        ("fused", 2, 2),
        ("eager", 1, 4),
    ]:
        trainer = train_one_step(
            copy.deepcopy(base),
            tmp_path / f"{loss_impl}{batch_size}x{accumulation}",
            loss_type="dft",
            loss_impl=loss_impl,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        logged = [entry for entry in trainer.state.log_history if "loss" in entry][0]
        assert logged["loss"] == pytest.approx(expected.item(), rel=1e-5)
        results[(loss_impl, batch_size, accumulation)] = parameters_after(trainer)
    reference = results[("eager", 4, 1)]
    for key, parameters in results.items():
        for name, value in reference.items():
            torch.testing.assert_close(parameters[name], value, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="loss_impl"):
        make_args(tmp_path, loss_impl="fast")
    with pytest.raises(ValueError, match="z_loss"):
        make_args(tmp_path, z_loss=-1.0)
    with pytest.raises(ValueError, match="compute_loss_func"):
        ShiftLossTrainer(model=tiny_llama(), args=make_args(tmp_path), compute_loss_func=lambda *a, **k: 0)


def test_missing_labels_raise_a_clear_error(tmp_path):
    model = tiny_llama()
    trainer = ShiftLossTrainer(model=model, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="needs 'labels'"):
        trainer.compute_loss(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})


def losses_of_a_short_run(tmp_path, model, loss_impl, **overrides):
    trainer = train_one_step(
        model,
        tmp_path / loss_impl,
        loss_impl=loss_impl,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=0.1,
        **overrides,
    )
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_fused_and_eager_give_the_same_loss_curve(tmp_path, tie_word_embeddings):
    base = tiny_llama(tie_word_embeddings=tie_word_embeddings)
    eager_trainer, eager = losses_of_a_short_run(tmp_path, copy.deepcopy(base), "eager", z_loss=1e-3)
    fused_trainer, fused = losses_of_a_short_run(tmp_path, copy.deepcopy(base), "fused", z_loss=1e-3)
    assert eager_trainer.loss_path(eager_trainer.model).name == "eager"
    assert fused_trainer.loss_path(fused_trainer.model).name == "fused"
    assert len(eager) == len(fused) == 4
    for eager_entry, fused_entry in zip(eager, fused, strict=True):
        assert fused_entry["loss"] == pytest.approx(eager_entry["loss"], rel=1e-4)
        assert fused_entry["mean_token_accuracy"] == eager_entry["mean_token_accuracy"]
        assert fused_entry["entropy"] == pytest.approx(eager_entry["entropy"], rel=1e-4)  # TRL's name
        assert fused_entry["trained_tokens"] == eager_entry["trained_tokens"]
    for (name, eager_param), fused_param in zip(
        eager_trainer.model.named_parameters(), fused_trainer.model.parameters(), strict=True
    ):
        torch.testing.assert_close(fused_param, eager_param, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_gradient_accumulation_is_exact_too(tmp_path):
    base = tiny_llama()
    results = []
    for batch_size, accumulation in [(4, 1), (1, 4)]:
        trainer = train_one_step(
            copy.deepcopy(base),
            tmp_path / f"fused{batch_size}",
            loss_impl="fused",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        results.append(parameters_after(trainer))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_with_peft_lora_and_trained_lm_head(tmp_path):
    base = tiny_llama()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.0
    )
    # peft draws lora_A from the global generator: the same seed gives both runs the same adapter.
    torch.manual_seed(0)
    eager_model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(0)
    fused_model = get_peft_model(copy.deepcopy(base), config)
    eager_trainer, eager = losses_of_a_short_run(tmp_path, eager_model, "eager")
    fused_trainer, fused = losses_of_a_short_run(tmp_path, fused_model, "fused")
    assert fused_trainer.loss_path(fused_trainer.model).name == "fused"
    for eager_entry, fused_entry in zip(eager, fused, strict=True):
        assert fused_entry["loss"] == pytest.approx(eager_entry["loss"], rel=1e-4)


def test_unsplittable_model_falls_back_to_eager_and_says_why(tmp_path, caplog):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    model = get_peft_model(tiny_llama(), config)
    with caplog.at_level("WARNING"):
        trainer, logged = losses_of_a_short_run(tmp_path, model, "auto")
    path = trainer.loss_path(trainer.model)
    assert path.name == "eager" and "lm_head is adapted by peft" in path.reason
    assert "using the eager loss" in caplog.text and "lm_head is adapted by peft" in caplog.text
    assert caplog.text.count("using the eager loss") == 1
    assert all(math.isfinite(entry["loss"]) for entry in logged)


def test_evaluate_with_the_fused_path_matches_eager(tmp_path):
    model = tiny_llama()
    metrics = {}
    for loss_impl in ("eager", "fused"):
        trainer = ShiftLossTrainer(
            model=model,
            args=make_args(tmp_path / loss_impl, per_device_eval_batch_size=3, loss_impl=loss_impl),
            eval_dataset=Dataset.from_list(EXAMPLES),
            data_collator=PromptMaskingCollator(word_tokenizer()),
        )
        metrics[loss_impl] = trainer.evaluate()
    assert metrics["fused"]["eval_loss"] == pytest.approx(metrics["eager"]["eval_loss"], rel=1e-5)


def test_fsdp1_falls_back_to_eager_and_says_why_fsdp2_fuses(tmp_path, caplog):
    model = tiny_llama()
    trainer = ShiftLossTrainer(model=model, args=make_args(tmp_path, loss_impl="fused"))
    trainer.is_fsdp_enabled = True  # what Trainer sets under an FSDP accelerate config (version 1 here)
    with caplog.at_level("WARNING"):
        assert trainer.loss_path(model).name == "eager"
        assert trainer.loss_path(model).name == "eager"
    assert caplog.text.count("FSDP1 flattens the lm_head weight") == 1
    fsdp2 = ShiftLossTrainer(model=tiny_llama(), args=make_args(tmp_path, loss_impl="fused"))
    fsdp2.is_fsdp_enabled = True
    fsdp2._fsdp_version = lambda: (
        2
    )  # the sharded weight is gathered by the loss (2-rank test in test_fsdp.py)
    assert fsdp2.loss_path(fsdp2.model).name == "fused"


@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_token_accuracy_is_not_computed_when_not_logged(tmp_path, loss_impl, monkeypatch):
    import hf_shift_loss.loss.paths as loss_paths

    def forbidden(*args, **kwargs):
        raise AssertionError("token accuracy computed although log_token_accuracy=False")

    fused = loss_paths.fused_linear_cross_entropy

    def fused_without_count(*args, return_correct=False, **kwargs):
        assert not return_correct, "the fused loss counted correct tokens although they are not logged"
        return fused(*args, **kwargs)

    monkeypatch.setattr(loss_paths, "count_correct_tokens", forbidden)
    monkeypatch.setattr(loss_paths, "fused_linear_cross_entropy", fused_without_count)
    trainer = train_one_step(tiny_llama(), tmp_path, loss_impl=loss_impl, log_token_accuracy=False)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][0]
    assert "mean_token_accuracy" not in logged and logged["trained_tokens"] == 22
