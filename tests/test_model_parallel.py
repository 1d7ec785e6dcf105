"""A model split over devices with ``device_map`` (accelerate's hooks), for the eager and the fused loss.

What a CPU proves: the lm_head offloaded to disk (``device_map={"model": "cpu", "lm_head": "disk"}``:
accelerate keeps its weight on the ``meta`` device and loads it in the head's hook, as it does for a head
placed on another device) gives the loss and the backbone's gradients of the same model in one piece, on
both loss paths. The fused loss runs inside a call of the lm_head (``hf_shift_loss.loss.heads.call_as_lm_head``), so the hook
moves the hidden states to the head's execution device and loads its weight; the eager loss moves the
labels to the logits' device. On one CPU every "device" is the CPU, so the tensors' moves across real
devices (hidden states and labels to the head's GPU, gradients back to the backbone's) need a GPU machine:
``benchmarks/gpu_suite.py``'s ``model_parallel`` case runs this comparison with the backbone on cuda:0 and
the head on the CPU (or on cuda:1 with two GPUs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import dispatch_model
from helpers import tiny_llama

from hf_shift_loss.loss.paths import choose_loss_path

VOCAB_SIZE = 64


def _loss_and_backbone_grads(model, loss_impl: str, input_ids, labels):
    path = choose_loss_path(model, loss_impl)
    assert path.name == loss_impl
    loss = path(model, {"input_ids": input_ids}, labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if name.startswith("model.")}
    return loss.detach(), grads


@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_head_offloaded_by_device_map_gives_the_same_loss_and_gradients(tmp_path, loss_impl):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 11), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100
    whole = tiny_llama(VOCAB_SIZE)
    split = dispatch_model(
        copy.deepcopy(whole), device_map={"model": "cpu", "lm_head": "disk"}, offload_dir=str(tmp_path)
    )
    assert split.lm_head.weight.device.type == "meta"  # loaded only inside the head's own call

    expected_loss, expected_grads = _loss_and_backbone_grads(whole, "eager", input_ids, labels)
    loss, grads = _loss_and_backbone_grads(split, loss_impl, input_ids, labels)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert split.lm_head.weight.device.type == "meta"  # and offloaded again
