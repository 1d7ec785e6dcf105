"""Side-by-side forward+backward of the causal-LM loss from hidden states: time and peak extra memory.

Implementations, each run in its own subprocess (so that one's allocator state and peak memory cannot
leak into another's numbers):

- ``transformers``: ``logits = F.linear(hidden, weight)`` then ``transformers.loss.loss_utils.ForCausalLMLoss``
  (full ``[tokens, vocab]`` logits, upcast to float32 as transformers does).
- ``torch``: ``torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``, the
  chunked path of PyTorch (processes every position; untrained ones are ignore_index).
- ``ours``: ``hf_shift_loss.fused.fused_linear_cross_entropy`` (trained positions only, chunked).

Peak extra memory: on CPU the resident-set high-water mark during one forward+backward minus the resident
set after the inputs are allocated (``/proc/self/clear_refs`` resets the mark; ``ru_maxrss`` otherwise);
on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated memory before. It includes the gradients
wrt hidden and weight (outputs every implementation allocates: ``(N + V) * H`` floats).

Usage::

    python benchmarks/bench_loss.py            # full shapes, writes docs/performance.md and docs/img/bench_loss.png
    python benchmarks/bench_loss.py --quick    # small shapes, a smoke test (does not touch the docs)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("transformers", "torch", "ours")
SECTION_HEADING = "## Loss: fused linear + cross-entropy"
SEQUENCE_LENGTH = 1024  # tokens per row; a masked fraction masks the start (the prompt) of every row


@dataclass
class Case:
    tokens: int
    hidden_size: int
    vocab_size: int
    masked_fraction: float
    dtype: str
    device: str


@dataclass
class Measurement:
    implementation: str
    seconds_median: float
    seconds_all: list[float]
    cpu_seconds_median: float
    peak_extra_bytes: int
    loss: float


# ---------------------------------------------------------------------------------------------- worker


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def run_worker(case: Case, implementation: str, repetitions: int) -> Measurement:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from hf_shift_loss.fused import fused_linear_cross_entropy
    from hf_shift_loss.loss import shift_labels

    device = torch.device(case.device)
    dtype = getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(0)
    rows = max(1, case.tokens // SEQUENCE_LENGTH)
    seq = case.tokens // rows
    hidden = torch.randn(rows, seq, case.hidden_size, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(case.vocab_size, case.hidden_size, generator=generator) * 0.02).to(device, dtype)
    weight.requires_grad_()
    labels = torch.randint(0, case.vocab_size, (rows, seq), generator=generator).to(device)
    labels[:, : int(seq * case.masked_fraction)] = -100

    if implementation == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def loss_fn() -> torch.Tensor:
            return ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=case.vocab_size)

    elif implementation == "torch":
        from torch.nn import LinearCrossEntropyOptions

        options = LinearCrossEntropyOptions()
        targets = shift_labels(labels).reshape(-1)

        def loss_fn() -> torch.Tensor:
            return F.linear_cross_entropy(
                hidden.reshape(-1, case.hidden_size), weight, targets, ignore_index=-100, options=options
            )

    else:

        def loss_fn() -> torch.Tensor:
            return fused_linear_cross_entropy(hidden, weight, labels)

    cpu_seconds = []

    def step() -> float:
        hidden.grad = None
        weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_fn()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        cpu_seconds.append(time.process_time() - cpu_start)
        step.loss = float(loss.detach())
        return seconds

    # Memory of one step, measured from the first step (cold: includes what a first call allocates).
    hidden.grad = weight.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_extra = torch.cuda.max_memory_allocated() - baseline
    else:
        baseline = _resident_bytes("VmRSS")
        if _reset_peak_rss():
            step()
            peak_extra = _resident_bytes("VmHWM") - baseline
        else:
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            step()
            peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    cpu_seconds.clear()
    seconds = [step() for _ in range(repetitions)]
    return Measurement(
        implementation,
        statistics.median(seconds),
        seconds,
        statistics.median(cpu_seconds),
        peak_extra,
        step.loss,
    )


# ---------------------------------------------------------------------------------------------- driver


def measure(case: Case, implementation: str, repetitions: int) -> Measurement:
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps({"case": asdict(case), "implementation": implementation, "repetitions": repetitions}),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{implementation} on {case} failed:\n{result.stderr[-3000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def cases_to_run(quick: bool) -> list[Case]:
    import torch

    devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    dtypes = ["float32", "bfloat16"] if devices == ["cuda"] else ["float32"]
    shapes = [(2048, 256, 8000), (1024, 512, 32000)] if quick else [(4096, 1024, 32000), (2048, 2048, 128256)]
    return [
        Case(tokens, hidden_size, vocab, masked, dtype, device)
        for device in devices
        for dtype in dtypes
        for tokens, hidden_size, vocab in shapes
        for masked in (0.0, 0.5)
    ]


def gradient_bytes(case: Case) -> int:
    """The gradients every implementation returns: hidden ``[N, H]`` and weight ``[V, H]``."""
    element_size = 4 if case.dtype == "float32" else 2
    return (case.tokens + case.vocab_size) * case.hidden_size * element_size


def workspace_bytes(case: Case, measurement: Measurement) -> int:
    """Peak extra memory beyond the gradients (never below 0: RSS is measured in pages)."""
    return max(0, measurement.peak_extra_bytes - gradient_bytes(case))


def markdown_table(results: list[tuple[Case, dict[str, Measurement]]]) -> str:
    lines = [
        "| N × H × V | dtype | masked | implementation | time (s) | CPU time (s) | peak extra memory (MiB) "
        "| workspace (MiB) | time / transformers | time / torch | CPU time / transformers | CPU time / torch "
        "| memory / transformers | memory / torch | workspace / transformers |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, measured in results:
        reference, torch_lce = measured["transformers"], measured["torch"]
        for name in IMPLEMENTATIONS:
            m = measured[name]
            workspace, reference_workspace = workspace_bytes(case, m), workspace_bytes(case, reference)
            lines.append(
                f"| {case.tokens} × {case.hidden_size} × {case.vocab_size} | {case.dtype} "
                f"| {case.masked_fraction:.0%} | {name} | {m.seconds_median:.2f} | {m.cpu_seconds_median:.2f} "
                f"| {m.peak_extra_bytes / 2**20:.0f} | {workspace / 2**20:.0f} "
                f"| {m.seconds_median / reference.seconds_median:.2f} | {m.seconds_median / torch_lce.seconds_median:.2f} "
                f"| {m.cpu_seconds_median / reference.cpu_seconds_median:.2f} "
                f"| {m.cpu_seconds_median / torch_lce.cpu_seconds_median:.2f} "
                f"| {m.peak_extra_bytes / reference.peak_extra_bytes:.2f} "
                f"| {m.peak_extra_bytes / torch_lce.peak_extra_bytes:.2f} "
                f"| {workspace / reference_workspace:.2f} |"
            )
    return "\n".join(lines)


def plot(results: list[tuple[Case, dict[str, Measurement]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{c.tokens}×{c.hidden_size}×{c.vocab_size}\n{c.dtype}, {c.masked_fraction:.0%} masked"
        for c, _ in results
    ]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.27
    for offset, name in enumerate(IMPLEMENTATIONS):
        positions = [i + (offset - 1) * width for i in range(len(results))]
        time_axis.bar(positions, [m[name].seconds_median for _, m in results], width, label=name)
        memory_axis.bar(positions, [m[name].peak_extra_bytes / 2**20 for _, m in results], width, label=name)
    for axis, title in ((time_axis, "forward+backward time (s)"), (memory_axis, "peak extra memory (MiB)")):
        axis.set_xticks(range(len(results)), labels, fontsize=7)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def write_section(performance_md: Path, section: str) -> None:
    """Replace (or add) the loss section of docs/performance.md, leaving other sections untouched."""
    text = performance_md.read_text() if performance_md.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(SECTION_HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    performance_md.write_text(text)


def section_text(
    results: list[tuple[Case, dict[str, Measurement]]], device_name: str, repetitions: int
) -> str:
    return f"""{SECTION_HEADING}

`fused_linear_cross_entropy(hidden, lm_head.weight, labels)` against the two ways to get the same loss
from the last hidden states: transformers' own causal-LM loss on the full logits
(`ForCausalLMLoss(F.linear(hidden, weight), labels)`, float32 upcast), and PyTorch's chunked
`torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`. Forward + backward
(gradients wrt hidden and weight), each implementation in its own process; time is the median of
{repetitions} repetitions after a warm-up step (wall-clock, and CPU time of the process, which is less
sensitive to other load on a shared machine), peak extra memory is the high-water mark of one step minus
the memory holding the inputs. That includes the gradients wrt hidden and weight, `(N + V) · H` floats,
which every implementation returns (the weight gradient alone is 1 GiB for V = 128256, H = 2048);
"workspace" is the peak extra memory minus those gradients: what the loss itself costs. "masked" is the fraction of positions that are prompt (label -100): the fused loss skips them.
How it works: [fused-loss.md](fused-loss.md). Reproduce with `python benchmarks/bench_loss.py`.

Measured on {device_name}:

{markdown_table(results)}

![time and memory](img/bench_loss.png)

"""


def device_description() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cores = os.cpu_count()
    return f"CPU ({platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes; prints the table only")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--from-json", type=Path, help="rewrite the docs from saved results, measure nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        measurement = run_worker(Case(**spec["case"]), spec["implementation"], spec["repetitions"])
        print(json.dumps(asdict(measurement)))
        return

    results_json = REPO / "benchmarks" / "results_loss.json"
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results = [
            (Case(**entry["case"]), {name: Measurement(**m) for name, m in entry["measured"].items()})
            for entry in saved["results"]
        ]
        write_docs(results, saved["device"], saved["repetitions"])
        return

    results = []
    for case in cases_to_run(args.quick):
        measured = {}
        for implementation in IMPLEMENTATIONS:
            measured[implementation] = measure(case, implementation, args.repetitions)
            m = measured[implementation]
            print(
                f"{case} {implementation}: {m.seconds_median:.2f}s {m.peak_extra_bytes / 2**20:.0f} MiB "
                f"loss={m.loss:.6f}",
                flush=True,
            )
        losses = [m.loss for m in measured.values()]
        if max(losses) - min(losses) > 1e-3 * abs(losses[0]):
            raise RuntimeError(f"implementations disagree on the loss for {case}: {losses}")
        results.append((case, measured))

    print(markdown_table(results))
    if not args.quick:
        device = device_description()
        saved = {
            "device": device,
            "repetitions": args.repetitions,
            "results": [
                {"case": asdict(c), "measured": {n: asdict(m) for n, m in ms.items()}} for c, ms in results
            ],
        }
        results_json.write_text(json.dumps(saved, indent=1) + "\n")
        write_docs(results, device, args.repetitions)


def write_docs(results: list[tuple[Case, dict[str, Measurement]]], device: str, repetitions: int) -> None:
    """Rewrite this benchmark's section of docs/performance.md and its plot."""
    write_section(REPO / "docs" / "performance.md", section_text(results, device, repetitions))
    plot(results, REPO / "docs" / "img" / "bench_loss.png")


if __name__ == "__main__":
    main()
