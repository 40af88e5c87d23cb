"""How long each phase of `run_train.py --compile true --half-res-training` spends compiling: the
train phase at the half resolution, then the fine-tune at the test resolution. `--as-before-d7b4cab`
compiles the way the code did before that commit: no reset between phases and Dynamo's automatic
dynamic shapes, under which the fine-tune's new resolution was traced as a dynamic size.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python scripts/compile_per_phase.py
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python scripts/compile_per_phase.py --as-before-d7b4cab

Give each run an empty Inductor cache (as above): a graph compiled by an earlier run would
otherwise be read from the disk cache and take seconds. Prints the seconds of every micro-step;
each phase's first one holds its compile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_train  # noqa: E402
from parallel import data_parallel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--as-before-d7b4cab", action="store_true", help="no reset, dynamic=None (the old code)")
    parser.add_argument("--resolution", type=int, default=64, help="the test resolution (trained at 3/4 of it)")
    args = parser.parse_args()
    if args.as_before_d7b4cab:
        torch.compiler.reset = lambda: None
        compile_model = torch.compile
        torch.compile = lambda module, mode=None, dynamic=None: compile_model(module, mode=mode)

    seconds = []
    micro_step = data_parallel.Runner.micro_step

    def timed_micro_step(self, *step_args, **step_kwargs):
        started = time.perf_counter()
        done = micro_step(self, *step_args, **step_kwargs)
        seconds.append(time.perf_counter() - started)
        return done

    data_parallel.Runner.micro_step = timed_micro_step
    with tempfile.TemporaryDirectory() as output_dir:
        code = run_train.main([
            "--config", "demo", "--resolution", str(args.resolution), "--half-resolution",
            str(args.resolution * 3 // 4), "--half-res-training", "--epochs", "1", "--max-steps-per-epoch", "6",
            "--micro-batch-size", "16", "--workers", "0", "--progress", "false", "--output-dir", output_dir,
            "--fine-tune-epochs", "1", "--compile", "true", "--validate-every", "0"])
    if code != 0:
        sys.exit(code)
    label = "as before d7b4cab" if args.as_before_d7b4cab else "now"
    print(f"{label}: micro-step seconds " + " ".join(f"{value:.2f}" for value in seconds))


if __name__ == "__main__":
    main()
