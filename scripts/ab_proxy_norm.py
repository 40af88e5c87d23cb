"""Interleaved A/B of Proxy Norm implementations in one process (training steps of B0 G16-LN+PN).

    python scripts/ab_proxy_norm.py --what function --resolution 160 --precision fp32
    python scripts/ab_proxy_norm.py --what fold --resolution 224 --precision bf16
    python scripts/ab_proxy_norm.py --what parts --resolution 160 --precision fp32
    python scripts/ab_proxy_norm.py --what table --device cuda --batch-size 128 --resolution 160
    python scripts/ab_proxy_norm.py --what cache --mode inference --batch-size 1 --precision fp32
    python scripts/ab_proxy_norm.py --what parts --device cuda --batch-size 128 --resolution 160

--what function: ProxyNormAct with the fused recomputing autograd Function against the same
                 formula in plain autograd ops. (Since the folds, a training step only uses the
                 Function where no fold applies; docs/benchmarks.md B.5 was measured before them.)
--what fold:     MBConv as the model runs it (Proxy Norm folded into the SE gate, and into the
                 spatial conv where the expanded tensor has at least FOLD_MIN_ELEMENTS), against
                 the unfolded block (each norm layer applying its own Proxy Norm).
--what parts:    where Proxy Norm's cost is: LN, LN+PN, and LN+PN with one part taken away at a
                 time (the moments' gradient, the SE's Proxy Norm terms, the folds). The first two
                 take away maths and are for timing only.
--what table:    LN+PN with its moments computed in one batched table (what the model and, since
                 docs/benchmarks.md A.8, a pipeline stage do) against each layer computing its
                 own (what a stage did before; what a compiled model does): the same values.
--what fold_gpu: LN+PN as shipped against the folds forced on where an eager GPU skips them
                 (every output of at least FOLD_MIN_ELEMENTS folded, as on the CPU): the same
                 values. On the CPU the two rows run the same code.
--what cache:    LN, and LN+PN with its moments reused while the parameters are unchanged (what
                 the model does without autograd) or computed on every forward; use with
                 --mode inference.
Rounds alternate A and B so that drift of a shared machine hits both; medians are printed. The
step is run_benchmark.py's training (or, with --mode inference, inference) step for the
efficientnet-b0-g16-lnpn config, on the CPU or (--device cuda) a GPU, eager.
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

from models import efficientnet  # noqa: E402
from models.efficientnet import ConvNormAct, EfficientNet, MBConv, SqueezeExcite  # noqa: E402
from models.proxy_norm import ProxyNormAct, apply_affine  # noqa: E402
from parallel.context import ParallelError, pick_device, tune_for_device  # noqa: E402
from run_benchmark import BenchmarkConfig, parse_row, prepare_row  # noqa: E402
from training.host_memory import retain_freed_memory  # noqa: E402
from training.measure import synchronize  # noqa: E402


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


def constant_table(self: EfficientNet, modules=None, cache=None):
    """The moment table without its gradient: no backward through the moments or the small
    per-layer ops that use them (timing only: Proxy Norm's parameters then learn nothing)."""
    with torch.no_grad():
        return ORIGINAL_TABLE(self, modules, cache)


def se_without_proxy_terms(self: SqueezeExcite, x, mean=None, inv_std=None):
    """The SE gate as without Proxy Norm (timing only: drops μ̃ and 1/σ̃ from the block)."""
    return ORIGINAL_SE(self, x, None, None)


def never_fold(self: ConvNormAct, x, table, input_affine, fold):
    """Each Proxy Norm applied by its own layer: the same values as the folds."""
    return ORIGINAL_FOR_CONV(self, x, table, input_affine, False)


def per_layer_moments(self: EfficientNet, modules=None, cache=None):
    """No table: each Proxy Norm layer computes its own moments (the same values)."""
    return None


def never_launch_bound(x) -> bool:
    """Folds wherever the CPU folds (the same values)."""
    return False


def uncached_table(self: EfficientNet, modules=None, cache=None):
    """The moments computed on every forward, as before they were reused in inference."""
    return ORIGINAL_TABLE(self, modules, None)


ORIGINAL_TABLE, ORIGINAL_SE = EfficientNet.proxy_table, SqueezeExcite.forward_split
ORIGINAL_FOR_CONV = ConvNormAct.forward_for_conv

# --what → {label: (benchmark row, {(owner, method name): replacement})}; the first label is the reference
VARIANTS = {
    "function": lambda spec: {"current": (spec, {}), "plain": (spec, {(ProxyNormAct, "forward"): plain_proxy_forward})},
    "fold": lambda spec: {"current": (spec, {}), "unfolded": (spec, {(MBConv, "forward"): unfolded_block_forward})},
    "parts": lambda spec: {
        "LN": (spec + "+proxy_norm=false", {}),
        "LN+PN": (spec, {}),
        "LN+PN, constant moment table": (spec, {(EfficientNet, "proxy_table"): constant_table}),
        "LN+PN, SE without its Proxy Norm terms": (spec, {(SqueezeExcite, "forward_split"): se_without_proxy_terms}),
        "LN+PN, no folds": (spec, {(ConvNormAct, "forward_for_conv"): never_fold}),
    },
    "table": lambda spec: {
        "LN+PN, batched moment table": (spec, {}),
        "LN+PN, each layer its own moments": (spec, {(EfficientNet, "proxy_table"): per_layer_moments}),
    },
    "fold_gpu": lambda spec: {
        "LN+PN as shipped": (spec, {}),
        "LN+PN, folds forced on": (spec, {(efficientnet, "launch_bound"): never_launch_bound}),
    },
    "cache": lambda spec: {
        "LN": (spec + "+proxy_norm=false", {}),
        "LN+PN, moments reused while unchanged": (spec, {}),
        "LN+PN, moments computed every forward": (spec, {(EfficientNet, "proxy_table"): uncached_table}),
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--steps", type=int, default=2, help="timed steps a variant runs in each round")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    for option in ("rounds", "steps", "batch_size", "resolution"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    try:
        device = pick_device(args.device, 0)
    except ParallelError as error:
        parser.error(str(error))
    tune_for_device(device)
    retain_freed_memory()  # as the entry points do (docs/benchmarks.md A.1)

    layout = "cl" if args.precision == "bf16" else "nocl"
    spec = f"efficientnet-b0-g16-lnpn@{args.resolution}+{args.precision}+{layout}"
    variants = VARIANTS[args.what](spec)
    replaced = {target for _, patches in variants.values() for target in patches}
    originals = {target: getattr(*target) for target in replaced}
    config = BenchmarkConfig(batch_size=args.batch_size, mode=args.mode)
    steps = {label: prepare_row(parse_row(row), config, device).step for label, (row, _) in variants.items()}

    times: dict[str, list[float]] = {label: [] for label in variants}
    try:
        for round_index in range(args.rounds + 1):  # the first round is untimed: a process's first steps are slow
            for label, (_, patches) in variants.items():
                for (owner, name), original in originals.items():
                    setattr(owner, name, patches.get((owner, name), original))
                steps[label]()  # warm-up for this variant
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[label]()
                synchronize(device)
                if round_index:
                    times[label].append((time.perf_counter() - start) / args.steps)
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    first = statistics.median(next(iter(times.values())))
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{args.what} {args.precision} {args.resolution}px {label}: {args.batch_size / median:.1f} img/s, "
              f"{1e3 * median:.1f} ms a step ({1e3 * (median - first):+.1f} ms against the first row; "
              f"rounds: {', '.join(f'{args.batch_size / t:.1f}' for t in values)})")


if __name__ == "__main__":
    main()
