"""The fused loss under FSDP2: two gloo ranks with sharded parameters give the one-process update.

``accelerate launch --config_file tests/dist_scripts/fsdp2_cpu.yaml`` starts two CPU ranks under FSDP2
(``fully_shard`` per decoder layer and at the root); the lm_head weight is a DTensor shard after the
forward pass, and the fused loss gathers it itself (``hf_shift_loss.loss.engines.unsharded``). One optimizer step over
the same 8 examples (tests/dist_scripts/train_one_step.py) is compared with one process.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from test_distributed import ROOT, SCRIPT, _free_port, _run

FSDP_CONFIG = os.path.join(ROOT, "tests", "dist_scripts", "fsdp2_cpu.yaml")

pytestmark = pytest.mark.slow


def _single(out, loss_impl: str, tie: bool) -> dict:
    command = [sys.executable, SCRIPT, "--out", str(out), "--per-device-batch", "8", "--accumulation", "1"]
    return _run([*command, "--loss-impl", loss_impl, *(["--tie"] if tie else [])], str(out))


def _fsdp2(out, tie: bool) -> dict:
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG),
        *("--main_process_port", str(_free_port())),
        SCRIPT,
        *("--out", str(out), "--per-device-batch", "2", "--accumulation", "2", "--loss-impl", "fused"),
        *(["--tie"] if tie else []),
    ]
    return _run(command, str(out))


def _relative(update: dict, reference: dict) -> dict[str, float]:
    return {
        name: float((update[name] - expected).norm() / expected.norm().clamp(min=1e-12))
        for name, expected in reference.items()
    }


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fsdp2_fused_equals_one_process(tmp_path, tie):
    sharded = _fsdp2(tmp_path / "fsdp2", tie)
    fused = _single(tmp_path / "fused", "fused", tie)
    eager = _single(tmp_path / "eager", "eager", tie)
    assert sharded["world_size"] == 2 and sharded["fused"] and fused["fused"] and not eager["fused"]
    assert set(sharded["update"]) == set(fused["update"])
    # Sharding changes nothing: the same fused update on every parameter.
    assert max(_relative(sharded["update"], fused["update"]).values()) < 1e-4
    # Against the eager loss: the whole update agrees to 1e-5, every parameter to 1e-4 but where float32
    # summation order alone (fused vs eager, also in one process) moves a tiny layer-norm update.
    against_eager = _relative(sharded["update"], eager["update"])
    same_process = _relative(fused["update"], eager["update"])
    for name, difference in against_eager.items():
        assert difference < max(1e-4, 2 * same_process[name]), name
    flat = lambda update: torch.cat([update[name].flatten() for name in sorted(update)])  # noqa: E731
    assert (
        float((flat(sharded["update"]) - flat(eager["update"])).norm() / flat(eager["update"]).norm()) < 1e-5
    )
    # The logged loss is the global token mean, as in one process.
    assert sharded["logged_loss"] == pytest.approx(eager["reference_token_mean"], rel=1e-5)
