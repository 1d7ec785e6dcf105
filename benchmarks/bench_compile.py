"""The sync-free fused loss under torch.compile against the eager fused loss: forward+backward time and memory.

Implementations, each run in its own subprocess (one's allocator state, compiled code and peak memory
cannot leak into another's numbers):

- ``fused``: ``fused_linear_cross_entropy(hidden, weight, labels)``, the default mode (eager): selects the
  trained rows (``nonzero``, a host sync) and projects only those.
- ``sync_free``: ``fused_linear_cross_entropy(..., sync_free=True)``, eager: every row, the untrained ones
  masked inside; fixed shapes, no host sync.
- ``compiled``: the same sync-free call inside ``torch.compile(fullgraph=True, dynamic=False)`` (Inductor).

Each worker runs one warm-up step (for ``compiled``, the compilation: its time is reported separately),
then measures the peak extra memory of one step and the median time of ``--repetitions`` steps.
Peak extra memory: the resident-set high-water mark during the step minus the resident set before it
(``/proc/self/clear_refs`` resets the mark). Large allocations are served by ``mmap`` and given back to
the system when freed (``MALLOC_MMAP_THRESHOLD_`` fixed, ``malloc_trim`` before the step), so memory freed
by the warm-up does not hide the step's own. It includes the gradients wrt hidden and weight.

Usage::

    python benchmarks/bench_compile.py            # N=2048, H=1024, V=32000, 0% and 50% masked; writes
                                                  # results_compile.json and its section of docs/performance.md
    python benchmarks/bench_compile.py --quick    # small shapes, prints only
    python benchmarks/bench_compile.py --from-json benchmarks/results_compile.json   # rewrite the docs only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_common import reset_peak_rss, resident_bytes, write_section

REPO = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("fused", "sync_free", "compiled")
SEQUENCE_LENGTH = 1024  # tokens per row; the masked fraction masks the start (the prompt) of every row
SECTION_HEADING = "## Compiled: the sync-free fused loss under torch.compile"
BEFORE_HEADING = "## Packing"  # this section goes before it


@dataclass
class Case:
    tokens: int
    hidden_size: int
    vocab_size: int
    masked_fraction: float
    dtype: str


@dataclass
class Measurement:
    implementation: str
    seconds_median: float
    seconds_all: list[float]
    cpu_seconds_median: float
    warmup_seconds: float
    peak_extra_bytes: int
    loss: float


def run_worker(case: Case, implementation: str, repetitions: int) -> Measurement:
    import torch

    sys.path.insert(0, str(REPO))
    from hf_shift_loss.fused import fused_linear_cross_entropy

    dtype = getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(0)
    rows = max(1, case.tokens // SEQUENCE_LENGTH)
    seq = case.tokens // rows
    hidden = torch.randn(rows, seq, case.hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(case.vocab_size, case.hidden_size, generator=generator) * 0.02).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, case.vocab_size, (rows, seq), generator=generator)
    labels[:, : int(seq * case.masked_fraction)] = -100

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, sync_free=implementation != "fused")

    if implementation == "compiled":
        loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False)

    def step() -> float:
        hidden.grad = None
        weight.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        seconds = time.perf_counter() - start
        step.cpu_seconds.append(time.process_time() - cpu_start)
        step.loss = float(loss.detach())
        return seconds

    step.cpu_seconds = []

    warmup_seconds = step()
    hidden.grad = weight.grad = None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = resident_bytes("VmRSS")
    reset_peak_rss()
    step()
    peak_extra = resident_bytes("VmHWM") - baseline
    step.cpu_seconds.clear()
    seconds = [step() for _ in range(repetitions)]
    return Measurement(
        implementation,
        statistics.median(seconds),
        seconds,
        statistics.median(step.cpu_seconds),
        warmup_seconds,
        peak_extra,
        step.loss,
    )


def measure(case: Case, implementation: str, repetitions: int) -> Measurement:
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps({"case": asdict(case), "implementation": implementation, "repetitions": repetitions}),
    ]
    # Every allocation over 64 KiB is an mmap, returned to the system when freed (glibc otherwise raises
    # this threshold as blocks are freed, and freed memory would stay resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{implementation} on {case} failed:\n{result.stderr[-3000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def device_description() -> str:
    import platform

    import torch

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})"


def section_text(saved: dict) -> str:
    lines = [
        SECTION_HEADING,
        "",
        "`fused_linear_cross_entropy(..., sync_free=True)` inside `torch.compile(fullgraph=True, dynamic=False)`",
        "(what the trainer runs with `torch_compile=True`, `fused_sync_free` on) against the same call in eager",
        "mode and against the default mode, which projects only the trained rows (a host sync to count them).",
        "Forward + backward, gradients wrt hidden and a trainable weight, float32; each implementation in its",
        f"own process; median of {saved['repetitions']} steps after a warm-up step (the compilation, reported",
        "separately); peak extra memory is the resident-set high-water mark of one step over the memory before",
        f"it. {saved['device']}. Reproduce with `python benchmarks/bench_compile.py`",
        "(results: `benchmarks/results_compile.json`).",
        "",
        "| N × H × V | masked | implementation | time (s) | CPU time (s) | compile / warm-up (s) "
        "| peak extra (MiB) | CPU time / default mode | CPU time / sync-free eager | memory / default mode |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "fused": "default mode (eager)",
        "sync_free": "sync-free, eager",
        "compiled": "sync-free, compiled",
    }
    for entry in saved["results"]:
        case, measured = entry["case"], entry["measured"]
        base, sync_free = measured["fused"], measured["sync_free"]
        for name, m in measured.items():
            lines.append(
                f"| {case['tokens']} × {case['hidden_size']} × {case['vocab_size'] // 1000}k "
                f"| {case['masked_fraction']:.0%} | {names[name]} | {m['seconds_median']:.2f} "
                f"| {m['cpu_seconds_median']:.2f} | {m['warmup_seconds']:.1f} | {m['peak_extra_bytes'] / 2**20:.0f} "
                f"| {m['cpu_seconds_median'] / base['cpu_seconds_median']:.2f} "
                f"| {m['cpu_seconds_median'] / sync_free['cpu_seconds_median']:.2f} "
                f"| {m['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):.2f} |"
            )
    return "\n".join(lines) + "\n\n" + saved.get("analysis", "") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes; prints only")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--from-json", type=Path, help="rewrite the docs from saved results, measure nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        measurement = run_worker(Case(**spec["case"]), spec["implementation"], spec["repetitions"])
        print(json.dumps(asdict(measurement)))
        return
    results_json = REPO / "benchmarks" / "results_compile.json"
    if args.from_json:
        write_section(
            REPO / "docs" / "performance.md",
            SECTION_HEADING,
            section_text(json.loads(args.from_json.read_text())),
            before=BEFORE_HEADING,
        )
        return

    shape = (1024, 256, 8000) if args.quick else (2048, 1024, 32000)
    cases = [Case(*shape, masked, "float32") for masked in (0.5, 0.0)]
    results = []
    for case in cases:
        measured = {}
        for implementation in IMPLEMENTATIONS:
            m = measure(case, implementation, args.repetitions)
            measured[implementation] = m
            print(
                f"{case} {implementation}: {m.seconds_median:.2f}s (warm-up {m.warmup_seconds:.1f}s) "
                f"{m.peak_extra_bytes / 2**20:.0f} MiB loss={m.loss:.6f}",
                flush=True,
            )
        losses = [m.loss for m in measured.values()]
        if max(losses) - min(losses) > 1e-4 * abs(losses[0]):
            raise RuntimeError(f"implementations disagree on the loss for {case}: {losses}")
        fused = measured["fused"]
        ratios = {
            name: {
                "time_vs_fused": m.seconds_median / fused.seconds_median,
                "memory_vs_fused": m.peak_extra_bytes / max(fused.peak_extra_bytes, 1),
            }
            for name, m in measured.items()
        }
        results.append(
            {"case": asdict(case), "measured": {n: asdict(m) for n, m in measured.items()}, "ratios": ratios}
        )
        for name, ratio in ratios.items():
            print(
                f"  {name}: time {ratio['time_vs_fused']:.2f}x fused, memory {ratio['memory_vs_fused']:.2f}x"
            )

    if not args.quick:
        previous = json.loads(results_json.read_text()) if results_json.exists() else {}
        saved = {
            "device": device_description(),
            "repetitions": args.repetitions,
            "analysis": previous.get("analysis", ""),  # written by hand, kept across runs
            "results": results,
        }
        results_json.write_text(json.dumps(saved, indent=1) + "\n")
        write_section(
            REPO / "docs" / "performance.md", SECTION_HEADING, section_text(saved), before=BEFORE_HEADING
        )


if __name__ == "__main__":
    main()
