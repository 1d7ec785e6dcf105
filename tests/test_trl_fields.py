"""TRL's SFTConfig fields: each one maps onto ours or is refused naming the replacement (hf_shift_loss/trl_fields.py),
under TRL's names on ShiftLossArguments too, and docs/migrating-from-trl.md lists them all."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
from transformers import TrainingArguments

from hf_shift_loss import ShiftLossArguments
from hf_shift_loss.trl_fields import TRL_FIELDS

trl = pytest.importorskip("trl")

PAGE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "migrating-from-trl.md"
)
BASE = {f.name for f in dataclasses.fields(TrainingArguments)}
SFT_ONLY = [f.name for f in dataclasses.fields(trl.SFTConfig) if f.init and f.name not in BASE]


def test_every_field_of_the_installed_sftconfig_is_in_the_table():
    assert sorted(SFT_ONLY) == sorted(TRL_FIELDS)


def test_every_field_of_the_installed_sftconfig_is_in_the_migration_guide():
    with open(PAGE, encoding="utf-8") as file:
        table = file.read().split("## `SFTConfig` field by field")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `(\w+)`[^|]*\| ([^|]*) \|", table, flags=re.MULTILINE))
    assert set(SFT_ONLY) - set(rows) == set(), "SFTConfig fields missing from docs/migrating-from-trl.md"
    for name, spec in TRL_FIELDS.items():  # the page says what the code does
        assert rows[name].startswith(
            {"same": "same", "alias": f"alias of `{spec.ours}", "refused": "refused"}[spec.how]
        ), f"{name}: the page says {rows[name]!r}, the code {spec.how}"


def test_what_each_field_becomes_exists_here():
    ours = {f.name for f in dataclasses.fields(ShiftLossArguments)}
    for name, spec in TRL_FIELDS.items():
        assert name in ours, f"{name}: ShiftLossArguments does not take TRL's name"
        if spec.how != "refused":
            assert spec.ours in ours, name


@pytest.mark.parametrize(
    "trl_name, value, ours",
    [
        ("dataset_num_proc", 3, {"num_proc": 3}),
        ("packing_strategy", "bfd", {"packing_overflow": "truncate"}),
        ("packing_strategy", "bfd_split", {"packing_overflow": "split"}),
        ("trust_remote_code", True, {"model_init_kwargs": {"trust_remote_code": True}}),
        ("pad_to_multiple_of", "auto", {"pad_to_multiple_of": None}),
        ("loss_type", "chunked_nll", {"loss_type": "nll"}),
    ],
)
def test_trl_names_on_shift_loss_arguments_are_aliases(trl_name, value, ours):
    args = ShiftLossArguments(output_dir="out", **{trl_name: value})
    assert {name: getattr(args, name) for name in ours} == ours


@pytest.mark.parametrize(
    "trl_name, value",
    [
        ("activation_offloading", True),
        ("dataset_kwargs", {"skip_prepare_dataset": True}),
        ("pad_token", "<pad>"),
        ("router_aux_loss_coef", 0.001),
    ],
)
def test_refused_trl_names_say_what_to_use_instead(trl_name, value):
    with pytest.raises(ValueError, match=re.escape(f"{trl_name}={value!r}") + ".*; use "):
        ShiftLossArguments(output_dir="out", **{trl_name: value})
    with pytest.raises(ValueError, match=re.escape(TRL_FIELDS[trl_name].ours)):
        ShiftLossArguments.from_training_arguments(
            trl.SFTConfig(output_dir="out", bf16=False, **{trl_name: value})
        )


def test_an_alias_that_contradicts_its_field_is_refused():
    with pytest.raises(ValueError, match="dataset_num_proc=2 .* contradicts num_proc=4"):
        ShiftLossArguments(output_dir="out", dataset_num_proc=2, num_proc=4)
    with pytest.raises(ValueError, match="packing_overflow='split' is set too"):
        ShiftLossArguments(output_dir="out", packing_strategy="bfd", packing_overflow="split")
    with pytest.raises(ValueError, match="set one of them"):
        ShiftLossArguments(output_dir="out", train_on="last_turn", completion_only_loss=True)


def test_dft_is_the_plain_cross_entropy_weighted():
    assert ShiftLossArguments(output_dir="out", loss_type="dft").loss_type == "dft"
    with pytest.raises(ValueError, match="loss_type='dft' weights .* set both to 0"):
        ShiftLossArguments(output_dir="out", loss_type="dft", label_smoothing_factor=0.1)


def test_a_subclass_field_with_no_equivalent_stops_the_conversion():
    @dataclasses.dataclass
    class Custom(TrainingArguments):
        my_knob: int = 0

    ShiftLossArguments.from_training_arguments(Custom(output_dir="out"))  # at its default: nothing lost
    with pytest.raises(ValueError, match=r"Custom fields with no ShiftLossArguments equivalent: my_knob=3"):
        ShiftLossArguments.from_training_arguments(Custom(output_dir="out", my_knob=3))


def test_use_liger_kernel_keeps_our_loss():
    args = ShiftLossArguments(output_dir="out", use_liger_kernel=True, liger_kernel_config={"rms_norm": True})
    assert args.liger_kernel_config == {"rms_norm": True, "fused_linear_cross_entropy": False}
    with pytest.raises(ValueError, match="loss_impl='fused'"):
        ShiftLossArguments(
            output_dir="out", use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True}
        )
