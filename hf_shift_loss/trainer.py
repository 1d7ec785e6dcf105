"""``ShiftLossTrainer``: a ``transformers.Trainer`` that prepares the data, runs the loss, normalizes it.

What it adds to the stock Trainer, in the order of a run:

1. Setup (``__init__``): a model given by name is loaded, a ``peft_config`` applied, and every dataset
   without a ``data_collator`` prepared once (:func:`hf_shift_loss.data.prepare_dataset`: encode, mask,
   truncate, count, pack) and batched by :class:`hf_shift_loss.data.Batcher`.
2. The loss (``compute_loss``): the model runs without labels; the loss path chosen once per model
   (:mod:`hf_shift_loss.loss.paths`, eager or fused) computes the shifted cross-entropy, normalized
   over every trained token of the optimizer step (docs/concepts.md)::

       loss of one optimizer step = sum of CE over the trained tokens of every micro-batch on every rank
                                    / number of those tokens

   Each micro-batch contributes ``sum / global_count``; with ``average_tokens_across_devices`` the
   data-parallel gradient average over W ranks is undone by multiplying by W.
3. Logs: token accuracy (``mean_token_accuracy``), input tokens seen (``num_tokens``) and trained tokens
   per step (reduced over ranks), the data statistics, and an
   exact token-mean ``eval_loss`` with perplexity.

A subclass changes the loss without copying ``compute_loss`` (docs/extending.md): :meth:`token_loss`
(a per-token loss, decided once: is it overridden?), ``loss_weights`` in the batch, ``outputs.last_hidden_state``
for auxiliary terms, and :meth:`log_metric` for its own log entries.

The math lives in ``hf_shift_loss.loss``; this module only orchestrates and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_shift_loss.checkpoint import STATE_KEY, check_checkpoint
from hf_shift_loss.config import ShiftLossArguments
from hf_shift_loss.data.batch import Batcher, resolve_pad_token_id
from hf_shift_loss.data.encode import Encoder, detect_format
from hf_shift_loss.data.formats import apply_trl_dataset_options
from hf_shift_loss.data.load import load_tokenizer, set_tokenizer_options
from hf_shift_loss.data.pack import check_packing_support
from hf_shift_loss.data.prepare import PreparedDataset, dataset_columns, prepare_dataset
from hf_shift_loss.data.stats import DataStats
from hf_shift_loss.loss import EagerLoss, FusedLoss, choose_loss_path, count_trained_tokens
from hf_shift_loss.model_card import MODEL_TAGS, base_model_id, model_card

__all__ = ["ShiftLossArguments", "ShiftLossTrainer"]

logger = logging.getLogger(__name__)

# Batch keys that are targets, never model inputs; the loss also takes the weights of the targets.
_TARGET_KEYS = ("labels", "shift_labels")
_LOSS_KEYS = (*_TARGET_KEYS, "loss_weights")
DATA_SUMMARY_FILE = "data_summary.json"
# What the trainer (and the stock Trainer) log themselves: log_metric refuses these names.
_BUILT_IN_LOG_NAMES = frozenset(
    {
        "loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "step",
        "num_input_tokens_seen",
        "trained_tokens",
        "total_trained_tokens",
        "mean_token_accuracy",
        "num_tokens",
        "entropy",
    }
)


class ShiftLossTrainer(Trainer):
    """``transformers.Trainer`` whose ``compute_loss`` runs the shift / flatten / cross-entropy itself.

    Args:
        model: a causal LM, or a hub id / local path loaded with ``AutoModelForCausalLM``
            (``args.model_init_kwargs`` are passed to ``from_pretrained``).
        args: :class:`ShiftLossArguments`; a plain ``TrainingArguments`` is converted once.
        data_collator: batches raw rows yourself; without one, every dataset is prepared here.
        train_dataset / eval_dataset: ``datasets.Dataset``, ``IterableDataset``, a ``DatasetDict``
            (its ``"train"`` split for training; every split for evaluation) or a dict of datasets for
            evaluation. Rows in any format of :mod:`hf_shift_loss.data.encode`.
        processing_class: the tokenizer; optional when ``model`` is a name.
        peft_config: a peft config (e.g. ``LoraConfig``) applied to the model.
        formatting_func: as in TRL, ``row -> text`` (or ``-> messages``) applied to every raw row
            before it is encoded (:func:`hf_shift_loss.data.formats.apply_trl_dataset_options`).
        **kwargs: the other ``Trainer`` arguments (callbacks, optimizers, ...).

    Examples:
        >>> from datasets import Dataset  # doctest: +SKIP
        >>> trainer = ShiftLossTrainer(
        ...     model="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...     args=ShiftLossArguments(output_dir="out", max_length=1024, packing=True),
        ...     train_dataset=Dataset.from_list([{"prompt": "2+2=", "completion": "4"}] * 64),
        ... )  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    # compute_loss divides by the trained tokens of the whole optimizer step, so Trainer must not
    # divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict[str, Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "ShiftLossTrainer computes the causal-LM loss itself; compute_loss_func would be ignored. "
                "Use transformers.Trainer for a custom loss, or subclass ShiftLossTrainer.compute_loss."
            )
        args = ShiftLossArguments.from_training_arguments(args)
        if isinstance(model, str):
            model_init_kwargs = args.model_init_kwargs or {}
            if processing_class is None:
                processing_class = load_tokenizer(
                    model, trust_remote_code=bool(model_init_kwargs.get("trust_remote_code"))
                )
            model = AutoModelForCausalLM.from_pretrained(model, **model_init_kwargs)
        if processing_class is not None:
            _set_tokenizer_and_model_options(processing_class, model, args)
        if peft_config is not None:
            model = _apply_peft(model, peft_config, args.gradient_checkpointing)
        self.data_stats: dict[str, DataStats | None] = {}
        self._data_formats: dict[str, str] = {}
        if formatting_func is not None and data_collator is not None:
            raise ValueError(
                "formatting_func applies when the trainer prepares the datasets, but a data_collator is given (it "
                "gets the raw rows): apply the function in the collator or with dataset.map, or drop the collator"
            )
        if data_collator is None and (train_dataset is not None or eval_dataset is not None):
            if processing_class is None:
                raise ValueError(
                    "ShiftLossTrainer needs processing_class (the tokenizer) to prepare the datasets, or a "
                    "data_collator that batches them"
                )
            data_collator = Batcher(
                resolve_pad_token_id(processing_class),
                args.pad_to_multiple_of,
                padding_free=args.padding_free,
            )
            embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            prepare = functools.partial(
                self._prepare,
                args,
                processing_class,
                vocab_size=getattr(embeddings, "num_embeddings", None),
                formatting_func=formatting_func,
            )
            train_dataset = prepare(_train_split(train_dataset), "train")
            if isinstance(eval_dataset, dict):
                eval_dataset = {key: prepare(value, f"eval:{key}") for key, value in eval_dataset.items()}
            else:
                eval_dataset = prepare(eval_dataset, "eval")
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if hasattr(self.model, "add_model_tags"):  # pushed models carry them, as TRL's "trl", "sft"
            self.model.add_model_tags(list(MODEL_TAGS))
        # The stock label smoother would compute a second loss; label_smoothing_factor goes to our loss.
        self.label_smoother = None
        self._loss_metrics = _LossMetrics()
        self._eval_sums: list[torch.Tensor] | None = None
        self._loss_paths: dict[int, EagerLoss | FusedLoss] = {}
        self._normalization_problem: str | None = None  # why training steps cannot be counted, once known
        # The per-token loss hook, decided once: an overridden token_loss makes the loss per-token.
        self._token_loss = self.token_loss if _overrides(type(self), "token_loss") else None
        self._eval_metrics: _MetricWindow | None = None  # log_metric's window while evaluating
        # A padding-free batcher pads evaluation batches: decided once, here.
        collator = self.data_collator
        self._eval_collator = (
            dataclasses.replace(collator, padding_free=False)
            if isinstance(collator, Batcher) and collator.padding_free
            else collator
        )
        if self.compute_metrics is not None and self.args.prediction_loss_only:
            logger.warning(
                "compute_metrics will not be called: prediction_loss_only=True (ShiftLossArguments' default, so "
                "that evaluation does not gather [batch, seq, vocab] logits); pass prediction_loss_only=False "
                "to call it (evaluation then uses the eager loss, whose logits it needs)"
            )

    # ------------------------------------------------------------------ setup
    def _prepare(
        self,
        args: ShiftLossArguments,
        tokenizer: Any,
        dataset: Any,
        name: str,
        *,
        vocab_size: int | None,
        formatting_func: Callable[[dict[str, Any]], Any] | None,
    ) -> Any:
        if dataset is None:
            return None
        packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
        with args.main_process_first(desc=f"preparing the {name} set"):
            dataset = apply_trl_dataset_options(
                dataset,
                formatting_func=formatting_func,
                dataset_text_field=args.dataset_text_field,
                completion_only=args.train_on_for("prompt_completion") == "completion",
                name=name,
            )
            columns = dataset_columns(dataset, name)
            # No column: an empty dataset, which prepare_dataset refuses by name before encoding anything.
            options = (
                args.encoder_options(detect_format(columns)) if columns else {"max_length": args.max_length}
            )
            prepared: PreparedDataset = prepare_dataset(
                dataset,
                Encoder(tokenizer, **options),
                packing=packing,
                packing_overflow=args.packing_overflow,
                on_untrained=args.on_untrained,
                num_proc=args.num_proc,
                name=name,
                vocab_size=vocab_size,
                shuffle_seed=args.seed if args.shuffle_dataset else None,
            )
        self.data_stats[name] = prepared.stats
        self._data_formats[name] = prepared.format
        return prepared.dataset

    def run_summary(self) -> str:
        """What this run will do, in a few lines: the loss path and why, what is trained, packing,
        normalization, and each prepared dataset's counts. Printed once when training starts."""
        args = self.args
        path = self.loss_path(self.model)
        if path.name == "fused":
            loss = "fused lm_head + cross-entropy in chunks of trained tokens (no [batch, seq, vocab] logits)"
        else:
            loss = f"eager: full logits, then causal_lm_loss ({path.reason})"
        trained = {
            "completion": f"the completion / every {'+'.join(args.train_roles)} turn",
            "last_turn": f"the last {'+'.join(args.train_roles)} turn only",
            "all": "every token",
        }[args.train_on]
        ranks = args.world_size if args.average_tokens_across_devices else 1
        if self.data_stats:
            data = [
                f"trained: {trained}; end-of-turn tokens: {args.train_end_of_turn}; max_length {args.max_length}",
                f"packing: {f'on, rows of {args.max_length} tokens' if args.packing else 'off'}; batches: "
                f"{'padding-free, one row per micro-batch' if args.padding_free else 'rows padded to the longest'}",
            ]
        else:
            data = [
                "trained, packing: as the given data_collator makes the batches (datasets not prepared here)"
            ]
        normalization = (
            f"normalization: sum of CE over the trained tokens of each optimizer step "
            f"({args.gradient_accumulation_steps} micro-batch(es) x {ranks} rank(s)) / their number"
        )
        if self._normalization_problem is not None:
            normalization = f"normalization: NOT exact {self._normalization_problem}"
        elif not self.data_stats:
            normalization += ", counted from the labels of each batch the data_collator returns"
        lines = [f"loss: {loss}", *data, normalization]
        for name, stats in self.data_stats.items():
            counts = stats.summary() if stats is not None else "streamed: counted as rows are read"
            lines.append(f"{name} set ({self._data_formats[name]}): {counts}")
        return "\n".join(["[hf_shift_loss] run summary", *("  " + line for line in lines)])

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """Stock ``Trainer.train``; saves the data summary with the run (``data_summary.json``) and, when
        resuming, first refuses a checkpoint with a missing or unreadable piece
        (:func:`hf_shift_loss.checkpoint.check_checkpoint`), then restores the loss metrics saved in it,
        so the resumed run logs exactly what the uninterrupted run logs (``total_trained_tokens``, the
        per-step window, accuracy)."""
        if self.is_world_process_zero():  # one summary per job: accelerator.print alone prints once per node
            self.accelerator.print(self.run_summary())
        if self.is_world_process_zero() and self.data_stats:
            os.makedirs(self.args.output_dir, exist_ok=True)
            summary = {name: stats.as_dict() if stats else None for name, stats in self.data_stats.items()}
            with open(os.path.join(self.args.output_dir, DATA_SUMMARY_FILE), "w", encoding="utf-8") as file:
                json.dump(summary, file, indent=2)
        self._loss_metrics, self._resumed_window = _LossMetrics(), None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # Trainer raises if None
        if resume_from_checkpoint:
            saved = check_checkpoint(
                resume_from_checkpoint,
                process_index=self.args.process_index,
                world_size=self.args.world_size,
                optimizer_state=not self.args.save_only_model,
                deepspeed=self.is_deepspeed_enabled,
            )
            self._loss_metrics, self._resumed_window = _LossMetrics.from_state(
                saved, self.args.process_index, self.args.world_size, self.args.device
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Stock ``save_model``, plus the model card (``README.md``, :meth:`create_model_card`) next to the
        weights: a full model, a peft adapter and every checkpoint get one."""
        super().save_model(output_dir, _internal_call)
        self._write_model_card(output_dir or self.args.output_dir)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        *,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
        **card_data: Any,
    ) -> None:
        """Write ``README.md`` in ``args.output_dir`` (what ``push_to_hub`` uploads): TRL's card (base
        model, dataset, tags, quick start, versions) plus the run summary (loss path, what was trained,
        data counts). No network. ``finetuned_from`` and ``dataset`` are the stock names of
        ``base_model`` and ``dataset_name``; other keywords (``license``, ``language``, ...) go to the
        card's metadata as given.
        """
        self._write_model_card(
            self.args.output_dir,
            model_name=model_name,
            dataset_name=dataset_name or dataset,
            tags=[tags] if isinstance(tags, str) else tags,
            base_model=finetuned_from,
            card_data=card_data,
        )

    def _write_model_card(
        self,
        folder: str,
        *,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: list[str] | None = None,
        base_model: str | None = None,
        card_data: dict[str, Any] | None = None,
    ) -> None:
        if not self.is_world_process_zero():
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        hub_model_id = self.args.hub_model_id
        text = model_card(
            model_name=model_name or (hub_model_id or os.path.abspath(folder)).rstrip("/").split("/")[-1],
            base_model=base_model or base_model_id(getattr(base, "config", None)),
            run_summary=self.run_summary(),
            dataset_name=dataset_name,
            hub_model_id=hub_model_id,
            tags=[*(tags or []), *(getattr(unwrapped, "model_tags", None) or [])],
            card_data=card_data,
        )
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:
            file.write(text)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Stock RNG restore; then the stock loss window since the last log line, saved with the checkpoint
        (Trainer itself restarts it at the checkpoint, so the first resumed ``loss`` would miss steps)."""
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and getattr(self, "_resumed_window", None) is not None:
            self._tr_loss.fill_(self._resumed_window["loss_sum"])
            self._globalstep_last_logged = self._resumed_window["last_logged_step"]
            # The closing train_loss stays the mean over this call's steps (stock semantics): the restored
            # steps are drained into the total at the next log line, so they start it below zero.
            self._total_loss_scalar = -self._resumed_window["loss_sum"]

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Stock checkpoint, with the loss metrics of every rank inside its ``trainer_state.json``.

        The state is gathered here, on every rank, and the stock save writes it with the trainer state,
        its last file (:mod:`hf_shift_loss.checkpoint`): a checkpoint is never complete without it.
        """
        self.state.stateful_callbacks[STATE_KEY] = self._loss_metrics.state(
            self.accelerator, self._tr_loss, self._globalstep_last_logged
        )
        super()._save_checkpoint(model, trial)

    def _load_callback_state(self) -> None:
        """Stock restore of callbacks' states; the project's own entry is not a callback's (read in :meth:`train`)."""
        saved = self.state.stateful_callbacks.pop(STATE_KEY, None)
        try:
            super()._load_callback_state()
        finally:
            if saved is not None:
                self.state.stateful_callbacks[STATE_KEY] = saved

    # ------------------------------------------------------------------ normalization
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Trained tokens of one optimizer step: every micro-batch, and every rank when averaging.

        Counted after the shift (the first label of a row is never a target), or on ``shift_labels``
        when the collator provides pre-shifted targets, in any mapping a collator returns (a ``dict``,
        ``transformers.BatchEncoding``, ...). A step whose batches cannot be counted (on any rank) is
        said once, and the run summary stops claiming exact normalization (:meth:`_uncounted`).
        """
        counts, problem = [], None
        for batch in batch_samples:
            if not isinstance(batch, Mapping) or not any(key in batch for key in _TARGET_KEYS):
                keys = sorted(batch) if isinstance(batch, Mapping) else "none: not a mapping"
                problem = (
                    f"a micro-batch of type {type(batch).__name__} (keys: {keys}) has no labels to count"
                )
                break
            counts.append(_count_batch_trained_tokens(batch).to(device))
        if not batch_samples:
            problem = "the step has no micro-batch"
        trained_tokens = sum(counts) if problem is None else torch.tensor(-1, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # Every rank gathers, countable or not (a rank that skipped the gather would hang the others).
            gathered = self.accelerator.gather(torch.as_tensor(trained_tokens, device=device).reshape(1))
            if problem is None and bool((gathered < 0).any()):
                problem = "another rank's micro-batches cannot be counted (see its warning)"
            trained_tokens = gathered.sum()
        if problem is not None:
            self._uncounted(problem)
            return None
        return trained_tokens

    def _uncounted(self, problem: str) -> None:
        """Say once that training steps are no longer normalized exactly, and why (run summary + warning)."""
        if not self.model.training or self._normalization_problem is not None:
            return  # evaluation sums its rows itself; a training problem is said once
        self._normalization_problem = f"from step {self.state.global_step + 1}, {problem}"
        logger.warning(
            "normalization is not exact %s; such a step's loss is the mean of its micro-batches' token means. "
            "Return a mapping (dict or BatchEncoding) with 'labels' or 'shift_labels' from the data_collator",
            self._normalization_problem,
        )
        if self.is_world_process_zero():
            print(self.run_summary())

    def _data_parallel_scale(self) -> int:
        """Factor that undoes the data-parallel gradient mean when the loss uses the global count."""
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return self.accelerator.num_processes
        return 1

    def loss_path(self, model: nn.Module) -> EagerLoss | FusedLoss:
        """The loss path for ``model``, chosen once per model (:func:`hf_shift_loss.loss.choose_loss_path`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if id(unwrapped) not in self._loss_paths:
            self._loss_paths[id(unwrapped)] = choose_loss_path(
                unwrapped,
                self.args.loss_impl,
                label_smoothing=self.args.label_smoothing_factor,
                z_loss=self.args.z_loss,
                chunk_size=self.args.fused_chunk_size,
                fsdp_version=self._fsdp_version(),
                zero3=self._zero3_config(),
                loss_type=self.args.loss_type,
                sync_free=self.args.torch_compile
                if self.args.fused_sync_free is None
                else self.args.fused_sync_free,
            )
        return self._loss_paths[id(unwrapped)]

    def _fsdp_version(self) -> int | None:
        if not self.is_fsdp_enabled:
            return None
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return int(getattr(plugin, "fsdp_version", 1) or 1)

    def _zero3_config(self) -> dict | None:
        """DeepSpeed's ``zero_optimization`` section when ZeRO stage 3 runs, else None."""
        plugin = (
            getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        )
        zero = (plugin.deepspeed_config if plugin is not None else {}).get("zero_optimization", {})
        return zero if zero.get("stage") == 3 else None

    # ------------------------------------------------------------------ batches
    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        """Stock, but a padding-free batcher pads evaluation batches: one row per example is what makes
        the evaluation loss exact across ranks (the sampler's duplicates are dropped row by row)."""
        with self._padded_batches():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        """Stock, with padded batches as :meth:`get_eval_dataloader`."""
        with self._padded_batches():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _padded_batches(self) -> Iterator[None]:
        training_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            yield
        finally:
            self.data_collator = training_collator

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Run the model without labels, then the causal-LM loss normalized over the optimizer step.

        ``inputs``: ``input_ids`` ``[batch, seq]``, ``attention_mask`` or (packed) ``position_ids``,
        ``labels`` aligned with ``input_ids`` (or pre-shifted ``shift_labels``), and optional
        ``loss_weights`` ``[batch, seq]`` aligned with ``labels`` (training multiplies each trained token's
        loss by its weight; the evaluation loss stays the plain cross-entropy). ``num_items_in_batch``:
        trained tokens of the optimizer step, all micro-batches and ranks (None outside the step loop).

        With ``return_outputs=True`` the model's outputs come back with ``last_hidden_state``
        ``[batch, seq, hidden]`` (the lm_head's input) on both loss paths; on the fused path they have no
        logits, and reading ``outputs.logits`` raises :class:`hf_shift_loss.loss.LogitsNotComputedError`.

        Examples:
            An auxiliary term in a subclass, on either loss path (docs/extending.md runs it):

            >>> class Regularized(ShiftLossTrainer):  # doctest: +SKIP
            ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ...         loss, outputs = super().compute_loss(
            ...             model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            ...         loss = loss + 1e-3 * outputs.last_hidden_state.float().pow(2).mean()
            ...         return (loss, outputs) if return_outputs else loss
        """
        targets, shift = _targets(inputs)
        model_inputs = {key: value for key, value in inputs.items() if key not in _LOSS_KEYS}
        if "position_ids" in model_inputs and "attention_mask" not in model_inputs:
            model_inputs["use_cache"] = False  # packed: the block-diagonal mask is only built without a cache
            check_packing_support(
                self.accelerator.unwrap_model(model), model_inputs["position_ids"], use_cache=False
            )
        training = model.training
        path = self.loss_path(model)
        if not training and not self.args.prediction_loss_only:  # compute_metrics needs the logits
            path = EagerLoss(path.label_smoothing, path.z_loss, path.router_aux_loss_coef, path.loss_type)
        loss, correct, outputs, router_loss, entropy_sum = path(
            model,
            model_inputs,
            targets,
            shift=shift,
            reduction="mean" if training else "none",
            num_items_in_batch=num_items_in_batch if training else None,
            count_correct=training and self.args.log_token_accuracy,
            measure_entropy=training and self.args.log_entropy,
            loss_weights=inputs["loss_weights"] if training and "loss_weights" in inputs else None,
            token_loss=self._token_loss if training else None,
        )
        trained_tokens = count_trained_tokens(targets, shift=shift, per_row=True).to(loss.device)
        if not training:  # evaluation: per-row sums and counts, for the exact token mean of the eval set
            row_sums = loss.detach().reshape(trained_tokens.shape[0], -1).sum(-1)
            if self._eval_sums is not None:
                self._add_eval_rows(row_sums, trained_tokens)
            loss = row_sums.sum() / trained_tokens.sum().clamp(min=1)
        elif num_items_in_batch is None:  # outside the step loop: a micro-batch mean, scaled for accumulation
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        else:
            loss = loss * self._data_parallel_scale()  # undo DDP's gradient mean: the count is global
        if training and router_loss is not None:  # MoE: as the model adds it, averaged over micro-batches
            loss = loss + router_loss / getattr(self, "current_gradient_accumulation_steps", 1)
        if training:
            self._loss_metrics.add(
                trained_tokens.sum(), correct, _count_input_tokens(model_inputs), entropy_sum
            )
        return (loss, outputs) if return_outputs else loss

    def token_loss(self, token_losses: torch.Tensor) -> torch.Tensor:
        """The per-token loss hook: override it to change each trained token's loss; returns it unchanged.

        The trainer sums what it returns (times the batch's ``loss_weights``, if any) and divides by the
        trained tokens of the optimizer step, so a custom token loss keeps the exact normalization under
        gradient accumulation and data parallelism, and runs on the fused path without full logits (the
        fused loss then returns per-token losses and recomputes its logits in backward). Whether the hook
        is overridden is decided once, when the trainer is built; not overridden, the loss is reduced in
        one pass. Training only: ``eval_loss`` stays the plain cross-entropy (and its perplexity).

        Args:
            token_losses: float32 ``[trained]``, the loss of each trained token of the micro-batch, row by
                row, differentiable. It is the cross-entropy ``-log p(target)`` (so ``p = exp(-loss)``)
                unless ``label_smoothing_factor`` or ``z_loss`` add their terms to it, or
                ``loss_type="dft"`` multiplies it by its detached ``p``.

        Returns:
            ``[trained]`` float values, one per token (a ValueError names any other shape).

        Examples:
            Focal loss (gamma 2): confident tokens count less.

            >>> class FocalTrainer(ShiftLossTrainer):
            ...     def token_loss(self, token_losses):
            ...         target_probability = torch.exp(-token_losses)
            ...         return (1 - target_probability) ** 2 * token_losses
        """
        return token_losses

    def log_metric(self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        """Log ``name`` with the next log line: the ``weight``-ed mean of its values over the window, all ranks.

        Call it from a subclass (in ``compute_loss``, ``token_loss``, ...) once per micro-batch, with a
        0-dim tensor; it is added up on the device (no host sync) and reduced over ranks only when the
        trainer logs, like ``mean_token_accuracy``. Logged: ``sum(value * weight) / sum(weight)`` over every call
        since the last log line on every rank (``weight=trained_tokens`` gives a token mean). Called
        during evaluation, it goes to the evaluation's metrics as ``eval_<name>``. Every rank must log the
        same names (a ValueError says which differ).

        Args:
            name: the log entry's name; not one the trainer logs itself (``loss``, ``mean_token_accuracy``, ...).
            value: a number or a one-element tensor (detached here: logging never trains).
            weight: how much this value counts in the mean (a number or a one-element tensor).

        Examples:
            >>> class LoggingTrainer(ShiftLossTrainer):
            ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ...         loss, outputs = super().compute_loss(
            ...             model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            ...         self.log_metric("hidden_norm", outputs.last_hidden_state.detach().norm(dim=-1).mean())
            ...         return (loss, outputs) if return_outputs else loss
        """
        if not isinstance(name, str) or not name or name in _BUILT_IN_LOG_NAMES or name.startswith("eval_"):
            raise ValueError(
                f"log_metric name {name!r}: give a non-empty name that is not one the trainer logs itself "
                f"({', '.join(sorted(_BUILT_IN_LOG_NAMES))}) and does not start with 'eval_' (evaluation adds it)"
            )
        window = self._eval_metrics if self._eval_metrics is not None else self._loss_metrics.custom
        window.add(name, value, weight, self.args.device)

    def _add_eval_rows(self, row_sums: torch.Tensor, row_tokens: torch.Tensor) -> None:
        """Add one eval batch's rows of every rank, without the sampler's padding duplicates.

        Under data parallelism the last batches are completed with rows from the start of the set, so
        that every rank runs as many batches; ``gather_for_metrics`` drops them again.
        """
        rows = torch.stack([row_sums.float(), row_tokens.float()], dim=-1)  # counts < 2**24 per row: exact
        rows = self.accelerator.gather_for_metrics(rows)
        self._eval_sums[0] += rows[:, 0].sum()
        self._eval_sums[1] += rows[:, 1].sum().long()

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss metrics (reduced over all ranks) and, once per run, the train set's data counts."""
        if "loss" in logs and "eval_loss" not in logs:
            steps = self.state.global_step - self._loss_metrics.last_logged_step
            logs.update(self._loss_metrics.pop(self.accelerator, max(steps, 1)))
            logs.update(self._loss_metrics.custom.pop(self.accelerator))
            self._loss_metrics.last_logged_step = self.state.global_step
            train_stats = self.data_stats.get("train")
            if train_stats is not None and not self._loss_metrics.data_stats_logged:
                logs.update(train_stats.log_entries("data"))
                self._loss_metrics.data_stats_logged = True
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Stock evaluation, with ``eval_loss`` replaced by the exact token mean and perplexity added.

        The stock loop averages per-batch means, which weighs a batch of 3 trained tokens like a batch
        of 3000; here every trained token of the evaluation set weighs the same, on every rank.
        """
        device = self.args.device
        self._eval_sums = [torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)]
        self._eval_metrics = _MetricWindow()
        try:
            output = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            sums, self._eval_sums = self._eval_sums, None
            eval_metrics, self._eval_metrics = self._eval_metrics, None
        output.metrics.update(eval_metrics.pop(self.accelerator, prefix=f"{metric_key_prefix}_"))
        loss_sum, trained_tokens = sums[0], int(sums[1])  # gathered over ranks batch by batch
        if trained_tokens > 0:
            mean_loss = float(loss_sum) / trained_tokens
            perplexity = math.exp(mean_loss) if mean_loss < 700 else math.inf
        else:  # a mean over nothing: NaN, never a 0.0 that reads as a perfect model
            mean_loss = perplexity = math.nan
            logger.warning(
                "%s: the evaluation set has no trained token, so %s_loss is NaN; check its masking "
                "(train_on, train_roles) and max_length",
                metric_key_prefix,
                metric_key_prefix,
            )
        output.metrics[f"{metric_key_prefix}_loss"] = mean_loss
        output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity
        output.metrics[f"{metric_key_prefix}_trained_tokens"] = trained_tokens
        return output


def _set_tokenizer_and_model_options(tokenizer: Any, model: nn.Module, args: ShiftLossArguments) -> None:
    """TRL's ``eos_token`` and ``chat_template_path``: on the tokenizer, and ``eos_token`` also among the
    model's eos ids (config and generation config), so generation stops where training taught it to."""
    set_tokenizer_options(tokenizer, eos_token=args.eos_token, chat_template_path=args.chat_template_path)
    if args.eos_token is None or not hasattr(model, "config"):
        return
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        ids = generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tokenizer.eos_token_id not in ids:
            generation_config.eos_token_id = [tokenizer.eos_token_id, *ids]


def _overrides(cls: type, name: str) -> bool:
    """Whether ``cls`` (a ShiftLossTrainer subclass) defines its own ``name``."""
    return getattr(cls, name) is not getattr(ShiftLossTrainer, name)


def _targets(batch: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
    """``(targets, shift)``: pre-shifted ``shift_labels`` as they are, else ``labels`` to be shifted."""
    if "shift_labels" in batch:
        return batch["shift_labels"], False
    if "labels" in batch:
        return batch["labels"], True
    raise ValueError(
        f"ShiftLossTrainer needs 'labels' (or pre-shifted 'shift_labels') in the batch, got keys {sorted(batch)}; "
        "let the trainer prepare the dataset (no data_collator), or add labels in your collator"
    )


def _count_input_tokens(model_inputs: Mapping[str, Any]) -> torch.Tensor:
    """Input tokens of a batch (TRL's ``num_tokens``): the attended ones of padded rows; every position of
    packed or padding-free rows (their only padding is what ``pad_to_multiple_of`` or the batch's longest
    packed row adds)."""
    if "attention_mask" in model_inputs:
        return model_inputs["attention_mask"].sum()
    reference = model_inputs.get("position_ids", model_inputs["input_ids"])
    return torch.tensor(reference.numel(), device=reference.device)


def _count_batch_trained_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    targets, shift = _targets(batch)
    return count_trained_tokens(targets, shift=shift)


def _train_split(dataset: Any) -> Any:
    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        if "train" not in dataset:
            raise ValueError(
                f"train_dataset is a DatasetDict without a 'train' split (splits: {sorted(dataset)})"
            )
        return dataset["train"]
    return dataset


# peft 0.21's PeftModel reads transformers 5's deprecated ``is_gradient_checkpointing`` alias, which warns.
PEFT_DEPRECATED_ALIAS_WARNING = ".*is_gradient_checkpointing.*deprecated"


def _apply_peft(model: nn.Module, peft_config: Any, gradient_checkpointing: bool) -> nn.Module:
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("the model is already a PeftModel; pass peft_config=None or the base model")
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs inputs that require grad
    with warnings.catch_warnings():
        # Nothing the user can change: pinned by tests/test_pins.py, which fails once it is no longer needed.
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATED_ALIAS_WARNING, category=FutureWarning)
        return get_peft_model(model, peft_config)


class _LossMetrics:
    """Token counts accumulated on device between log lines (no host sync per step); saved with checkpoints.

    Logged under TRL's names where TRL has one (``mean_token_accuracy``, ``num_tokens``, ``entropy``),
    with ours where they add something (``trained_tokens``, ``total_trained_tokens``).
    """

    # The per-window sums, in the order a checkpoint gathers them; the entropy sum is a float, the rest counts.
    _WINDOW = ("trained_tokens", "correct_tokens", "input_tokens", "entropy_sum")

    def __init__(self) -> None:
        self.trained_tokens: torch.Tensor | None = None
        self.correct_tokens: torch.Tensor | None = None
        self.input_tokens: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.total_trained_tokens = 0
        self.total_input_tokens = 0
        self.last_logged_step = 0
        self.data_stats_logged = False
        self.custom = _MetricWindow()
        """What a subclass logs with ``ShiftLossTrainer.log_metric``."""

    def state(self, accelerator: Any, loss_window: torch.Tensor, last_logged_step: int) -> dict[str, Any]:
        """What a checkpoint keeps: the totals, and every rank's window since the last log line.

        ``loss_window``: the stock Trainer's on-device loss sum since the last log line (``_tr_loss``).
        Every rank must call it (the windows are gathered).
        """
        device = loss_window.device
        # float64 holds every count exactly (< 2**53) and the float32 entropy sum; -1: no value (all are >= 0).
        values = [getattr(self, name) for name in self._WINDOW]
        window = torch.stack(
            [torch.as_tensor(-1 if value is None else value, device=device).double() for value in values]
        )
        windows = accelerator.gather(window.reshape(1, len(self._WINDOW))).tolist()
        losses = accelerator.gather(loss_window.detach().float().reshape(1)).tolist()
        return {
            "total_trained_tokens": self.total_trained_tokens,
            "total_input_tokens": self.total_input_tokens,
            "last_logged_step": self.last_logged_step,
            "data_stats_logged": self.data_stats_logged,
            "stock_last_logged_step": last_logged_step,
            "ranks": [
                {
                    **{
                        f"window_{name}": None
                        if value < 0
                        else value
                        if name == "entropy_sum"
                        else int(value)
                        for name, value in zip(self._WINDOW, rank_window, strict=True)
                    },
                    "loss_sum": loss,
                }
                for rank_window, loss in zip(windows, losses, strict=True)
            ],
            "window_custom": self.custom.summed_state(accelerator),
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], process_index: int, world_size: int, device: torch.device
    ) -> tuple[_LossMetrics, dict[str, Any]]:
        """This rank's metrics and stock loss window (``loss_sum``, ``last_logged_step``) from :meth:`state`.

        Resumed on another number of ranks, the saved windows are folded: their token counts go to rank
        0 (the log line sums over ranks) and every rank takes their mean loss (the log line averages).
        """
        metrics = cls()
        metrics.total_trained_tokens = int(state["total_trained_tokens"])
        metrics.total_input_tokens = int(state.get("total_input_tokens", 0))  # absent before num_tokens
        metrics.last_logged_step = int(state["last_logged_step"])
        metrics.data_stats_logged = bool(state["data_stats_logged"])
        ranks = state["ranks"]
        if len(ranks) == world_size:
            mine = ranks[process_index]
        else:
            logger.warning(
                "the checkpoint was saved by %d ranks and resumes on %d: the loss window since the last log "
                "line is folded (its token counts on rank 0, its mean loss on every rank)",
                len(ranks),
                world_size,
            )
            mine = {"loss_sum": sum(rank["loss_sum"] for rank in ranks) / len(ranks)}
            for name in cls._WINDOW:
                values = [rank.get(f"window_{name}") for rank in ranks]
                values = [value for value in values if value is not None]
                mine[f"window_{name}"] = sum(values) if values and process_index == 0 else None
        for name in cls._WINDOW:
            value = mine.get(f"window_{name}")
            dtype = torch.float32 if name == "entropy_sum" else torch.long
            setattr(metrics, name, None if value is None else torch.tensor(value, dtype=dtype, device=device))
        # The custom window was summed over ranks when saved: rank 0 takes it, the others the same names at 0.
        metrics.custom = _MetricWindow.from_state(
            state.get("window_custom", {}), device, zero=process_index != 0
        )
        return metrics, {
            "loss_sum": mine["loss_sum"],
            "last_logged_step": int(state["stock_last_logged_step"]),
        }

    def add(
        self,
        trained_tokens: torch.Tensor,
        correct_tokens: torch.Tensor | None,
        input_tokens: torch.Tensor | None = None,
        entropy_sum: torch.Tensor | None = None,
    ) -> None:
        for name, value in zip(
            self._WINDOW, (trained_tokens, correct_tokens, input_tokens, entropy_sum), strict=True
        ):
            if value is not None:
                value = value.to(trained_tokens.device)
                current = getattr(self, name)
                setattr(self, name, value if current is None else current + value)

    def pop(self, accelerator: Any, steps: int) -> dict[str, float]:
        """Reduce over ranks, return the log entries, reset the window. Every rank must call it."""
        if self.trained_tokens is None:
            return {}
        trained = int(accelerator.reduce(self.trained_tokens.clone(), reduction="sum"))
        self.total_trained_tokens += trained
        logs = {"trained_tokens": trained / steps, "total_trained_tokens": float(self.total_trained_tokens)}
        if self.correct_tokens is not None:
            correct = int(accelerator.reduce(self.correct_tokens.clone(), reduction="sum"))
            logs["mean_token_accuracy"] = correct / trained if trained else 0.0
        if self.entropy_sum is not None:
            entropy = float(accelerator.reduce(self.entropy_sum.clone(), reduction="sum"))
            logs["entropy"] = entropy / trained if trained else 0.0
        if self.input_tokens is not None:
            self.total_input_tokens += int(accelerator.reduce(self.input_tokens.clone(), reduction="sum"))
            logs["num_tokens"] = float(self.total_input_tokens)
        self.trained_tokens = self.correct_tokens = self.input_tokens = self.entropy_sum = None
        return logs


class _MetricWindow:
    """``log_metric``'s values since the last log line: per name, the sums of ``value * weight`` and of
    ``weight``, float32 on the device (no host sync per call); reduced over ranks when popped."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # name -> [weighted value sum, weight sum]

    def add(
        self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float, device: torch.device
    ) -> None:
        pair = []
        for what, number in (("value", value), ("weight", weight)):
            number = torch.as_tensor(number).detach() if not torch.is_tensor(number) else number.detach()
            if number.numel() != 1:
                raise ValueError(
                    f"log_metric({name!r}): the {what} must be a number or a one-element tensor, got shape "
                    f"{tuple(number.shape)}; reduce it first (e.g. .mean(), or pass weight=count)"
                )
            pair.append(number.reshape(()).to(device=device, dtype=torch.float32))
        entry = torch.stack([pair[0] * pair[1], pair[1]])
        self.sums[name] = entry if name not in self.sums else self.sums[name] + entry

    def summed_state(self, accelerator: Any) -> dict[str, list[float]]:
        """The window summed over ranks, ``{name: [weighted value sum, weight sum]}``, for a checkpoint (the
        logged means only need the sums). Every rank must call it."""
        names, sums = self._reduced(accelerator)
        return {name: pair for name, pair in zip(names, sums, strict=True)}

    @classmethod
    def from_state(
        cls, state: dict[str, list[float]], device: torch.device, zero: bool = False
    ) -> _MetricWindow:
        """The window of :meth:`summed_state`; with ``zero``, its names with nothing added (other ranks)."""
        window = cls()
        window.sums = {
            name: torch.tensor([0.0, 0.0] if zero else sums, device=device) for name, sums in state.items()
        }
        return window

    def pop(self, accelerator: Any, prefix: str = "") -> dict[str, float]:
        """Reduce over ranks, return ``{prefix + name: weighted mean}``, reset. Every rank must call it."""
        names, sums = self._reduced(accelerator)
        self.sums = {}
        return {
            prefix + name: total / weight if weight != 0 else math.nan
            for name, (total, weight) in zip(names, sums, strict=True)
        }

    def _reduced(self, accelerator: Any) -> tuple[list[str], list[list[float]]]:
        """The names and their sums over every rank (ValueError when the ranks logged different names)."""
        names = sorted(self.sums)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            per_rank = gather_object([names])
            if any(rank_names != names for rank_names in per_rank):
                raise ValueError(
                    f"log_metric: the ranks logged different names since the last log line ({per_rank}); every "
                    "rank must log the same names (log a 0 with weight=0 where a rank has nothing to add)"
                )
        if not names:
            return [], []
        sums = accelerator.reduce(torch.stack([self.sums[name] for name in names]), reduction="sum")
        return names, sums.tolist()
