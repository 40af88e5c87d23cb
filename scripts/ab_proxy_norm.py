"""Interleaved A/B of Proxy Norm implementations in one process (training steps of B0 G16-LN+PN).

    python scripts/ab_proxy_norm.py --what function --resolution 160 --precision fp32
    python scripts/ab_proxy_norm.py --what fold --resolution 224 --precision bf16

--what function: ProxyNormAct with the fused recomputing autograd Function against the same
                 formula in plain autograd ops. (Since the folds, a training step only uses the
                 Function where no fold applies; docs/benchmarks.md B.5 was measured before them.)
--what fold:     MBConv with Proxy Norm folded into the SE gate and the spatial conv, against the
                 unfolded block (each norm layer applying its own Proxy Norm).
Rounds alternate A and B so that drift of a shared machine hits both; medians are printed. The
step is run_benchmark.py's training step for the efficientnet-b0-g16-lnpn config.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.efficientnet import MBConv  # noqa: E402
from models.proxy_norm import ProxyNormAct, apply_affine  # noqa: E402
from run_benchmark import BenchmarkConfig, parse_row, prepare_row  # noqa: E402
from training.host_memory import retain_freed_memory  # noqa: E402


def plain_proxy_forward(self: ProxyNormAct, x: torch.Tensor, table=None) -> torch.Tensor:
    y = self.pre_activation(x)
    mean, var = self.moments()
    activated = F.silu(y)
    if self.centre_only:
        return activated - mean.view(1, -1, 1, 1)
    scale = torch.rsqrt(var + self.proxy_eps)
    return torch.addcmul((-mean * scale).view(1, -1, 1, 1), activated, scale.view(1, -1, 1, 1))


def unfolded_block_forward(self: MBConv, x: torch.Tensor, table=None, input_affine=None) -> torch.Tensor:
    if input_affine is not None:  # the stem's Proxy Norm, owed by the model's forward
        x = apply_affine(x, *input_affine)
    out = self.spatial(self.expand(x))  # each layer applies its own (centred-only) Proxy Norm
    inv_std = torch.rsqrt(self.spatial.norm_act.moments()[1] + self.spatial.norm_act.proxy_eps)
    out = self.project(self.se(out, None, inv_std))
    return self.drop_path(out) + x if self.has_residual else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["function", "fold"], required=True)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    retain_freed_memory()  # as the entry points do (docs/benchmarks.md A.1)

    owner, name = (ProxyNormAct, "forward") if args.what == "function" else (MBConv, "forward")
    variants = {"new": getattr(owner, name),
                "old": plain_proxy_forward if args.what == "function" else unfolded_block_forward}
    layout = "cl" if args.precision == "bf16" else "nocl"
    spec = f"efficientnet-b0-g16-lnpn@{args.resolution}+{args.precision}+{layout}"
    step = prepare_row(parse_row(spec), BenchmarkConfig(batch_size=args.batch_size), torch.device("cpu")).step

    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, forward in variants.items():
            setattr(owner, name, forward)
            step()  # warm-up for this variant
            start = time.perf_counter()
            step()
            step()
            times[key].append((time.perf_counter() - start) / 2)
    setattr(owner, name, variants["new"])
    for key, values in times.items():
        label = {"new": "current", "old": "plain" if args.what == "function" else "unfolded"}[key]
        print(f"{args.what} {args.precision} {args.resolution}px {label}: "
              f"{args.batch_size / statistics.median(values):.1f} img/s "
              f"(rounds: {', '.join(f'{args.batch_size / t:.1f}' for t in values)})")


if __name__ == "__main__":
    main()
