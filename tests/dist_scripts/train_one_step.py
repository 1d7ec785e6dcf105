"""One optimizer step of ShiftLossTrainer on 8 fixed examples; saves the update and the logged loss.

Run it two ways and compare (tests/test_distributed.py does):

    # reference: one process, batch 8, no accumulation
    python tests/dist_scripts/train_one_step.py --out REF --per-device-batch 8 --accumulation 1
    # two gloo ranks on CPU, batch 2 x accumulation 2 per rank
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port PORT tests/dist_scripts/train_one_step.py \
        --out DIST --per-device-batch 2 --accumulation 2

Both see the same 8 examples in one optimizer step, so with exact normalization the SGD update (and the
logged loss, the token mean over all 8) must be the same. The examples have very different trained-token
counts, so any per-micro-batch or per-rank mean would show.

The same runs under any launcher: DeepSpeed (``accelerate launch --use_deepspeed --deepspeed_config_file
...``: the script then sets ``ddp_backend="gloo"``, tests/test_deepspeed.py), FSDP2 (tests/test_fsdp.py),
two "machines" (tests/test_multi_node.py). ``--variants untied-fused,tied-eager,...`` trains several model
variants (:data:`VARIANTS`) one after another in one launch, each into ``--out/NAME``; ``--evaluate`` also
evaluates the 8 examples after the step. ``--weighted`` gives every token an uneven ``loss_weights`` value,
and the trainer subclass logs the trained tokens' mean weight with ``log_metric`` (a token mean over
every micro-batch of every rank: the same number as one process's); ``--focal`` makes each token's loss
the focal loss through the ``token_loss`` hook (the fused path then runs per token).

Writes into --out: ``update.pt`` (rank 0: parameter after - before, ``{name: tensor}``, gathered whole
under FSDP2 and ZeRO-3), ``result.json`` (rank 0: logged loss, the global token mean and the per-example
CE sums and counts it comes from, the loss path, the evaluation metrics), ``rank{R}_batches.json`` (the
example indices each rank's training micro-batches held, in order).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from transformers import BatchEncoding, LlamaForCausalLM

from hf_shift_loss.trainer import ShiftLossArguments, ShiftLossTrainer

# The tests' own tiny Llama (tests/helpers.py), so that the reference and the ranks build the same model.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import leave_process_group, tiny_llama  # noqa: E402

VOCAB_SIZE = 128
# (prompt tokens, completion tokens) per example: trained-token counts from 1 to 45.
SHAPES = [(2, 2), (3, 40), (5, 3), (1, 30), (8, 2), (2, 45), (10, 4), (4, 20)]


def make_examples(weighted: bool = False) -> list[dict]:
    """8 pre-tokenized examples; labels aligned with input_ids, -100 on the prompt; uneven weights in
    [0.25, 2.25) per token when ``weighted``."""
    generator = torch.Generator().manual_seed(1234)
    weight_generator = torch.Generator().manual_seed(99)
    examples = []
    for index, (prompt_length, completion_length) in enumerate(SHAPES):
        input_ids = torch.randint(0, VOCAB_SIZE, (prompt_length + completion_length,), generator=generator)
        labels = input_ids.clone()
        labels[:prompt_length] = -100
        examples.append({"idx": index, "input_ids": input_ids.tolist(), "labels": labels.tolist()})
        if weighted:
            weights = 0.25 + 2 * torch.rand(len(input_ids), generator=weight_generator)
            examples[-1]["loss_weights"] = weights.tolist()
    return examples


def focal(token_losses: torch.Tensor) -> torch.Tensor:
    """Focal loss (gamma 2) of per-token cross-entropies."""
    return (1 - torch.exp(-token_losses)) ** 2 * token_losses


class FocalTrainer(ShiftLossTrainer):
    def token_loss(self, token_losses: torch.Tensor) -> torch.Tensor:
        return focal(token_losses)


class WeightLoggingTrainer(ShiftLossTrainer):
    """Logs the mean weight of the trained tokens, weighted by their number (a token mean)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            trained = inputs["labels"][:, 1:] != -100
            weights = inputs["loss_weights"][:, 1:][trained]
            self.log_metric("mean_weight", weights.mean(), weight=trained.sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class RecordingCollator:
    """Right-pads a batch ([batch, seq] tensors) and records which examples it held."""

    def __init__(self, batch_encoding: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.batch_encoding = batch_encoding  # return a transformers.BatchEncoding (not a dict), as theirs do

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        self.batches.append([int(example["idx"]) for example in examples])
        longest = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.zeros((len(examples), longest), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        weights = torch.zeros(input_ids.shape) if "loss_weights" in examples[0] else None
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.tensor(example["labels"])
            if weights is not None:
                weights[row, :length] = torch.tensor(example["loss_weights"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if weights is not None:
            batch["loss_weights"] = weights
        return BatchEncoding(batch) if self.batch_encoding else batch


@torch.no_grad()
def example_losses(
    model: LlamaForCausalLM, examples: list[dict], focal_loss: bool = False
) -> tuple[list[float], list[int]]:
    """Per example, one at a time: sum of (weighted) CE over its trained targets, and their number."""
    sums, counts = [], []
    for example in examples:
        input_ids = torch.tensor([example["input_ids"]])
        targets = torch.tensor(example["labels"][1:])
        logits = model(input_ids).logits[0, :-1].float()
        losses = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        if focal_loss:
            losses = focal(losses)
        if "loss_weights" in example:
            losses = losses * torch.tensor(example["loss_weights"][1:])
        sums.append(losses.sum().item())
        counts.append(int((targets != -100).sum()))
    return sums, counts


# Model variants one process can train in turn (--variants): name -> (loss_impl, tie_word_embeddings, lora).
VARIANTS = {
    "untied-eager": ("eager", False, False),
    "untied-fused": ("fused", False, False),
    "tied-eager": ("eager", True, False),
    "tied-fused": ("fused", True, False),
    "lora-fused": ("fused", False, True),
}


def avoid_deepspeed_shm_build() -> None:
    """Under DeepSpeed: skip the JIT build of its shared-memory all-reduce op (about 37 s per machine).

    DeepSpeed's first ``init_distributed`` on the CPU accelerator compiles ``deepspeed_shm_comm`` into
    ``~/.cache/torch_extensions``; the op serves only inference all-reduce, never training, and gloo does
    every collective without it. Marking it incompatible (DeepSpeed keeps one dict, so the edit
    persists) makes ``build_shm_op`` return None, as on a machine without a compiler.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole, on every rank: FSDP2 shards (DTensor) and ZeRO-3 partitions are gathered.

    Every rank must call it (the gathers are collectives).
    """
    parameters = dict(model.named_parameters())
    if any(hasattr(parameter, "ds_id") for parameter in parameters.values()):  # ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(parameters.values())):
            return {name: parameter.detach().clone() for name, parameter in parameters.items()}
    return {
        name: (parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter).detach().clone()
        for name, parameter in parameters.items()
    }


def train_variant(options: argparse.Namespace, out: str, loss_impl: str, tie: bool, lora: bool):
    """One optimizer step of one model variant; rank 0 writes ``update.pt`` and ``result.json`` into ``out``."""
    os.makedirs(out, exist_ok=True)
    examples = make_examples(options.weighted)
    model = tiny_llama(VOCAB_SIZE, tie_word_embeddings=tie)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    args = ShiftLossArguments(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=options.per_device_batch,
        per_device_eval_batch_size=3,  # 8 rows over 2 ranks x 3: the sampler repeats rows to fill a batch
        gradient_accumulation_steps=options.accumulation,
        max_steps=1,
        learning_rate=options.learning_rate,
        optim="sgd",
        max_grad_norm=0.0,  # no clipping: the update is lr * gradient, exactly comparable
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        average_tokens_across_devices=bool(options.average_tokens_across_devices),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # DeepSpeed picks its CPU accelerator itself and needs the gloo backend named; use_cpu would
        # make accelerate skip DeepSpeed.
        use_cpu=not deepspeed,
        ddp_backend="gloo" if deepspeed else None,
        seed=0,
        loss_impl=loss_impl,
    )
    collator = RecordingCollator(options.batch_encoding)
    peft_config = (
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if lora
        else None
    )
    trainer_class = WeightLoggingTrainer if options.weighted else ShiftLossTrainer
    if options.focal:
        trainer_class = type("FocalWeightLogging", (FocalTrainer, trainer_class), {})
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        data_collator=collator,
        peft_config=peft_config,
    )
    before = full_parameters(trainer.model)
    loss_sums, trained_counts = example_losses(
        trainer.model, examples, options.focal
    )  # with the adapter, if any
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    # ZeRO-3 leaves a 0-element placeholder where a partitioned parameter is not gathered (counted after
    # the step: DeepSpeed may leave what evaluation gathered in place).
    whole_at_rest = sum(parameter.numel() > 0 for parameter in trained.parameters())
    rank = trainer.accelerator.process_index
    with open(os.path.join(out, f"rank{rank}_batches.json"), "w") as file:
        json.dump(collator.batches, file)  # the training step's micro-batches
    metrics = trainer.evaluate(Dataset.from_list(examples)) if options.evaluate else {}
    after = full_parameters(trained)
    if trainer.accelerator.is_main_process:
        update = {name: parameter - before[name] for name, parameter in after.items()}
        torch.save(update, os.path.join(out, "update.pt"))
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        result = {
            "logged_loss": logged[0]["loss"],
            "reference_token_mean": sum(loss_sums) / sum(trained_counts),
            "example_loss_sums": loss_sums,
            "example_trained_tokens": trained_counts,
            "trained_tokens": logged[0].get("trained_tokens"),
            "mean_weight": logged[0].get("mean_weight"),
            "world_size": trainer.accelerator.num_processes,
            "fused": trainer.loss_path(trainer.model).name == "fused",
            "zero3_seen_by_the_loss_path": trainer._zero3_config() is not None,
            "run_summary": trainer.run_summary(),
            "parameters": len(after),
            "whole_parameters_at_rest": whole_at_rest,
            "eval_loss": metrics.get("eval_loss"),
            "eval_trained_tokens": metrics.get("eval_trained_tokens"),
        }
        with open(os.path.join(out, "result.json"), "w") as file:
            json.dump(result, file)
    return trainer


def main() -> None:
    # If a rank ever hangs, say where (stderr reaches the test's failure message).
    faulthandler.dump_traceback_later(90, exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--average-tokens-across-devices", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--loss-impl", choices=["eager", "fused"], default="eager")
    parser.add_argument("--tie", action="store_true", help="tie the lm_head to the input embeddings")
    parser.add_argument("--batch-encoding", action="store_true", help="the collator returns BatchEncoding")
    parser.add_argument(
        "--variants",
        help=f"comma-separated names of {sorted(VARIANTS)}, trained one after another, each into "
        "--out/NAME (instead of --loss-impl/--tie into --out)",
    )
    parser.add_argument("--evaluate", action="store_true", help="also evaluate the 8 examples after the step")
    parser.add_argument("--weighted", action="store_true", help="uneven loss_weights, and log their mean")
    parser.add_argument("--focal", action="store_true", help="the focal loss through the token_loss hook")
    options = parser.parse_args()
    avoid_deepspeed_shm_build()
    if options.variants:
        runs = [(os.path.join(options.out, name), *VARIANTS[name]) for name in options.variants.split(",")]
    else:
        runs = [(options.out, options.loss_impl, options.tie, False)]
    for out, loss_impl, tie, lora in runs:
        faulthandler.dump_traceback_later(90, exit=True)  # per variant
        trainer = train_variant(options, out, loss_impl, tie, lora)
    # Every rank leaves the process group itself, after the others are done with it: an unclean or
    # staggered exit sometimes hangs or aborts gloo at shutdown.
    leave_process_group(trainer.accelerator)


if __name__ == "__main__":
    main()
