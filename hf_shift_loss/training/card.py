"""The model card of :class:`hf_shift_loss.trainer.ShiftLossTrainer` (``README.md`` next to the weights):
TRL's card plus the run summary (:mod:`hf_shift_loss.model_card`)."""

from __future__ import annotations

import os
from typing import Any

from hf_shift_loss.model_card import base_model_id, model_card


class ModelCardMixin:
    """``Trainer`` overrides that write the model card with every save."""

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
