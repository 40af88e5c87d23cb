"""A/B of glibc's default (freed big blocks go back to the OS) against retained host memory
(training/host_memory.py): training steps of one model, with page faults and system time per step.

    python scripts/ab_host_memory.py --resolution 224 --precision fp32

A malloc setting cannot be undone faithfully inside a process (glibc's adaptive mmap threshold
does not come back), so each measurement is a fresh process; processes alternate between the two
settings for --rounds rounds, and medians are printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import VARIANTS  # noqa: E402
from run_benchmark import BenchmarkConfig, parse_row, prepare_row  # noqa: E402
from training.host_memory import retain_freed_memory  # noqa: E402

MODES = {"return": "returned to the OS (glibc default)", "retain": "retained"}


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Steady-state training steps in this process (run_benchmark.py's training step for the
    config MODEL-VARIANT): 2 untimed, then `--steps` timed."""
    if args.worker == "retain" and not retain_freed_memory():
        raise SystemExit("retaining host memory needs Linux with glibc")
    layout = "cl" if args.precision == "bf16" else "nocl"
    spec = f"{args.model}-{args.variant}@{args.resolution}+{args.precision}+{layout}"
    step = prepare_row(parse_row(spec), BenchmarkConfig(batch_size=args.batch_size), torch.device("cpu")).step
    step()
    step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": elapsed / args.steps, "faults": (after.ru_minflt - before.ru_minflt) / args.steps,
            "system": (after.ru_stime - before.ru_stime) / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-b0")
    parser.add_argument("--variant", choices=list(VARIANTS), default="g16-lnpn")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return

    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", mode], capture_output=True,
                                  text=True, check=True)
            results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"# {args.model} {args.variant} @{args.resolution} {args.precision}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.rounds} processes per setting, alternating")
    print("| host memory | s/step | img/s | page faults/step | system s/step |")
    print("|---|---|---|---|---|")
    for mode, label in MODES.items():
        step_s = statistics.median(r["seconds"] for r in results[mode])
        faults = statistics.median(r["faults"] for r in results[mode])
        system = statistics.median(r["system"] for r in results[mode])
        print(f"| {label} | {step_s:.3f} | {args.batch_size / step_s:.1f} | {faults:,.0f} | {system:.2f} |")


if __name__ == "__main__":
    main()
