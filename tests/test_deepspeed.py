"""DeepSpeed ZeRO-2 and ZeRO-3 through ShiftLossTrainer: two gloo ranks on CPU give the one-process update.

One launch per DeepSpeed recipe (ZeRO-2, ZeRO-3, ZeRO-3 with parameters and optimizer state offloaded to
CPU memory) trains five model variants in turn (tests/dist_scripts/train_one_step.py
``--variants``): untied and tied embeddings with the eager and the fused loss, and a peft LoRA adapter with
the fused loss; each takes one SGD step over the same 8 examples (2 ranks x batch 2 x accumulation 2) and
then evaluates them (2 ranks x batch 3: the sampler repeats rows to fill the last batches). One plain process
(batch 8) trains the same variants. Every parameter's update agrees to a relative 1e-4, the logged loss is the
global token mean, ``eval_loss`` is the one-process value, and the fused path is the one that ran.

How the ranks are started (what a user on a CPU-only machine must do too):

- ``accelerate launch --use_deepspeed --deepspeed_config_file recipes/accelerate/zeroN.json`` with
  ``ddp_backend="gloo"``. ``TrainingArguments(deepspeed=<dict>)`` inside one process per rank does not give two
  ranks on a CPU-only machine (accelerate tells each process it is a world of one): the world size is asserted.
- The JSON files are the recipes' own, with ``"auto"`` batch sizes, accumulation and clipping that the
  Trainer fills. For ZeRO-3 the test sets ``stage3_param_persistence_threshold`` to 0 (the recipe's "auto"
  would keep the tiny model's small parameters whole), and asserts that no parameter is whole between steps.
- DeepSpeed's first ``init_distributed`` JIT-builds a shared-memory all-reduce op (about 37 s, inference
  only): train_one_step.py marks it incompatible before DeepSpeed starts (``avoid_deepspeed_shm_build``),
  so the tests never compile anything.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from dist_scripts.train_one_step import VARIANTS
from helpers import tiny_llama
from test_distributed import (
    ROOT,
    SCRIPT,
    _execute,
    _free_port,
    _max_relative_difference,
    _read_result,
    _run_single,
    read_variants,
)
from transformers import LlamaForCausalLM

from hf_shift_loss.loss.heads import call_as_lm_head, get_output_head
from hf_shift_loss.loss.paths import EagerLoss, FusedLoss, choose_loss_path

pytest.importorskip("deepspeed")

RECIPES = os.path.join(ROOT, "recipes", "accelerate")
VOCAB_SIZE = 32  # the unit tests' tiny Llama
# One launch trains all five variants: DeepSpeed starts its engine five times.
LAUNCH_TIMEOUT_S = 420


def _launch(recipe: str, out, *script_args: str) -> int:
    """Two ranks of train_one_step.py under recipes/accelerate/{recipe}.json; returns the ZeRO stage."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(RECIPES, f"{recipe}.json"), encoding="utf-8") as file:
        config = json.load(file)
    stage = config["zero_optimization"]["stage"]
    if stage == 3:  # partition even the tiny model's norms: otherwise ZeRO-3 is barely tested
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config_file = out / "deepspeed.json"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    _execute(
        [
            *(sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed"),
            *("--deepspeed_config_file", str(config_file), "--zero3_init_flag", "false"),
            *("--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"),
            *("--dynamo_backend", "no", "--main_process_port", str(_free_port())),
            SCRIPT,
            *("--out", str(out), "--per-device-batch", "2", "--accumulation", "2"),
            *script_args,
        ],
        timeout_s=LAUNCH_TIMEOUT_S,
    )
    return stage


@pytest.fixture(scope="module", params=["zero2", "zero3", "zero3_offload"])
def zero(request, tmp_path_factory) -> tuple[int, dict[str, dict]]:
    """(stage, results per variant) of one two-rank launch with recipes/accelerate/{recipe}.json."""
    out = tmp_path_factory.mktemp(request.param)
    stage = _launch(request.param, out, "--variants", ",".join(VARIANTS), "--evaluate")
    return stage, read_variants(str(out), VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_two_ranks_equal_one_process(one_process_variants, zero, variant):
    stage, results = zero
    two, one = results[variant], one_process_variants[variant]
    assert two["world_size"] == 2 and one["world_size"] == 1
    # The path chosen is the one asked for; under ZeRO-3 the fused loss runs without falling back.
    assert two["fused"] == one["fused"] == variant.endswith("fused")
    assert ("fused lm_head" in two["run_summary"]) == variant.endswith("fused")
    assert two["zero3_seen_by_the_loss_path"] == (stage == 3) and not one["zero3_seen_by_the_loss_path"]
    if stage == 3:  # every parameter really is partitioned between steps
        assert two["whole_parameters_at_rest"] == 0 < two["parameters"]
    else:
        assert two["whole_parameters_at_rest"] == two["parameters"]
    assert set(two["update"]) == set(one["update"])
    assert _max_relative_difference(two["update"], one["update"]) < 1e-4
    assert two["trained_tokens"] == one["trained_tokens"] == 146
    assert two["logged_loss"] == pytest.approx(one["reference_token_mean"], rel=1e-5)
    # Evaluation over 2 ranks (repeated rows dropped): the token mean of the 8 examples, as in one process.
    assert two["eval_trained_tokens"] == one["eval_trained_tokens"] == 146
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_the_one_process_variants_differ(one_process_variants):
    """The variants are different models and paths: a mix-up of results would show."""
    updates = [one_process_variants[variant]["update"] for variant in ("untied-fused", "tied-fused")]
    assert set(updates[0]) != set(updates[1])  # tied: one parameter fewer
    lora = one_process_variants["lora-fused"]["update"]
    assert any("lora_" in name for name in lora)
    assert all(float(update.abs().max()) == 0 for name, update in lora.items() if "lora_" not in name)


@pytest.mark.slow
def test_zero3_loss_weights_and_a_token_loss_equal_one_process(tmp_path):
    """Uneven loss_weights and the focal token_loss hook under ZeRO-3: the fused loss runs per token and
    recomputes its logits in backward, inside a call of the partitioned head (gathered again then)."""
    one = _run_single(str(tmp_path / "one"), "fused", "--weighted", "--focal")
    assert _launch("zero3", tmp_path / "two", "--loss-impl", "fused", "--weighted", "--focal") == 3
    two = _read_result(str(tmp_path / "two"))
    assert two["fused"] and two["zero3_seen_by_the_loss_path"] and two["world_size"] == 2
    assert two["whole_parameters_at_rest"] == 0 < two["parameters"]
    assert one["logged_loss"] == pytest.approx(one["reference_token_mean"], rel=1e-5)
    assert two["logged_loss"] == pytest.approx(one["reference_token_mean"], rel=1e-5)
    assert _max_relative_difference(two["update"], one["update"]) < 1e-4
    assert two["mean_weight"] == pytest.approx(one["mean_weight"], rel=1e-6)


# ---------------------------------------------------------------- the choice, without launching


def _tiny(tie: bool = False) -> LlamaForCausalLM:
    return tiny_llama(VOCAB_SIZE, tie_word_embeddings=tie)


def test_zero3_fuses_by_default():
    path = choose_loss_path(_tiny(), "auto", zero3={"stage": 3, "stage3_param_persistence_threshold": 0})
    assert isinstance(path, FusedLoss)


def test_zero3_granularity_threshold_falls_back_with_the_reason():
    path = choose_loss_path(_tiny(), "auto", zero3={"stage": 3, "stage3_module_granularity_threshold": 100})
    assert isinstance(path, EagerLoss)
    assert path.reason.startswith("loss_impl='auto' fell back: DeepSpeed ZeRO-3")
    assert "stage3_module_granularity_threshold=100" in path.reason


def test_zero3_leaf_module_around_the_head_falls_back_with_the_reason():
    from deepspeed.utils import set_z3_leaf_modules

    model = _tiny()
    set_z3_leaf_modules(model, [LlamaForCausalLM])
    path = choose_loss_path(model, "fused", zero3={"stage": 3})
    assert isinstance(path, EagerLoss)
    assert "LlamaForCausalLM is a DeepSpeed ZeRO-3 leaf module" in path.reason
    # A leaf elsewhere (an MoE block, a decoder layer) gathers its own weights only: the head still fuses.
    other = _tiny()
    set_z3_leaf_modules(other, [type(other.model.layers[0])])
    assert isinstance(choose_loss_path(other, "fused", zero3={"stage": 3}), FusedLoss)


@pytest.mark.parametrize(
    ("leaf_module", "entry"),
    [
        ({"classes": ["LlamaForCausalLM"]}, "classes: 'LlamaForCausalLM'"),
        (
            {"classes": "transformers.models.llama.modeling_llama.LlamaForCausalLM"},
            "classes: 'transformers.models.llama.modeling_llama.LlamaForCausalLM'",
        ),
    ],
)
def test_zero3_leaf_module_config_around_the_head_falls_back_with_the_reason(leaf_module, entry):
    """DeepSpeed's own ``leaf_module`` config section marks leaves when the engine starts, after the loss
    path is chosen: the choice reads the config as DeepSpeed will apply it."""
    path = choose_loss_path(_tiny(), "auto", zero3={"stage": 3, "leaf_module": leaf_module})
    assert isinstance(path, EagerLoss)
    assert f"LlamaForCausalLM is a DeepSpeed ZeRO-3 leaf module (zero_optimization.leaf_module {entry})" in (
        path.reason
    )


def test_zero3_leaf_module_config_elsewhere_still_fuses():
    """DeepSpeed's default leaf classes (MoE blocks) and leaves by name or suffix away from the head: fused."""
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig

    defaults = DeepSpeedZeroLeafModuleConfig().model_dump()
    elsewhere = {"classes": defaults["classes"], "names": ["model.layers.0"], "name_suffixes": ["mlp"]}
    path = choose_loss_path(_tiny(), "auto", zero3={"stage": 3, "leaf_module": elsewhere})
    assert isinstance(path, FusedLoss)


class _GatheredOnlyInItsCall:
    """ZeRO-3's forward hooks in miniature: the head's weight is whole only inside a call of a module that
    holds it (the head, and the input embeddings when tied); a 0-element placeholder everywhere else."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.weight = model.lm_head.weight
        self.full = self.weight.data
        self.weight.data = torch.empty(0)
        self.head_calls = 0
        owners = [model.lm_head, model.get_input_embeddings()]
        for module in owners if model.get_input_embeddings().weight is self.weight else owners[:1]:
            module.register_forward_pre_hook(self.gather)
            module.register_forward_hook(self.release)
        model.lm_head.register_forward_pre_hook(self.count)

    def gather(self, module, args):
        self.weight.data = self.full

    def count(self, module, args):
        self.head_calls += 1

    def release(self, module, args, output):
        self.weight.data = torch.empty(0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fused_loss_runs_inside_a_call_of_the_head(tie):
    """The weight a ZeRO-3 hook gathers for the head's call is the one the fused loss uses."""
    model = _tiny(tie).eval()
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = EagerLoss()(model, {"input_ids": input_ids}, input_ids).loss
    fused = choose_loss_path(model, "fused", zero3={"stage": 3})
    hooks = _GatheredOnlyInItsCall(model)
    with torch.no_grad():
        loss = fused(model, {"input_ids": input_ids}, input_ids).loss
    assert hooks.head_calls == 2  # the model's own call (hidden states out), then the loss's
    assert model.lm_head.weight.numel() == 0  # released again
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_call_as_lm_head_restores_the_forward():
    model = _tiny()
    head = get_output_head(model)
    hidden = torch.randn(3, model.config.hidden_size)
    assert call_as_lm_head(head, lambda x: x.sum(), hidden) == hidden.sum()
    torch.testing.assert_close(model.lm_head(hidden), hidden @ model.lm_head.weight.T)
    assert "forward" not in model.lm_head.__dict__
