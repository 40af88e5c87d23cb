"""Validate checkpoints over a sweep of test resolutions and find the best and the Pareto-optimal ones.

    python run_validate.py --checkpoint runs/demo-.../checkpoint-...pt --resolution-range 16:64:8 --plot sweep.png
    python run_validate.py --checkpoint runs/demo-...            # every checkpoint of a run folder
    python run_validate.py --checkpoint efficientnet_b0.pth --config efficientnet-b0-g1-bn \\
        --interpolation bicubic --data imagenet --data-path /data/imagenet   # torchvision's or timm's weights

For each resolution: top-1, top-5, loss, inference images/s (eval mode, no autograd, warm-up
excluded, median over batches, the same batch size everywhere), GMACs per image and peak memory.
`--fine-tune-epochs N` applies the paper's protocol: fine-tune the head at each test resolution first.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

import parallel
import run_train
from datasets import DataError, SeededSampler, batch_bytes, check_shared_memory, eval_transform, make_loader
from models.flops import count_macs
from training.checkpoint import CheckpointError, WriteError, atomic_write, list_checkpoints, no_weights_in
from training.config import (
    MIN_RESOLUTION,
    ConfigError,
    TrainConfig,
    check_config,
    meta_model,
    named_config,
    native_resolution,
    option,
    parse_dataclass,
)
from training.data import open_dataset, set_preprocessing
from training.evaluate import autocast_context, evaluate
from training.host_memory import retain_freed_memory
from training.initial_weights import OWN_KINDS, classifier_outputs, fit_initial_weights, read_initial_weights
from training.measure import inference_throughput, peak_memory_bytes
from training.out_of_memory import allocation_failed, is_out_of_memory
from training.results import check_writable, write_csv, write_json
from training.trained import WEIGHTS, MissingWeights, load_weights, model_from_weights


@dataclass
class ValidateConfig:
    """What to sweep and how."""

    checkpoint: str = ""  # a checkpoint (.pt), exported weights (.safetensors), or a run folder
    config: str | None = None  # for weights without a config of their own (torchvision's or timm's EfficientNet file, a plain state dict): the config of their model, e.g. efficientnet-b0-g1-bn
    resolutions: str | None = None  # comma-separated test resolutions, e.g. 160,192,224
    resolution_range: str | None = None  # START:STOP:STEP, STOP included, e.g. 128:320:32
    crop_pct: float | None = None  # None: the checkpoint's
    interpolation: str | None = None  # test-time resize, bilinear | bicubic; None: the checkpoint's (bilinear for other weights)
    weights: str = "raw"  # raw | ema | averaged
    batch_size: int = 64  # for accuracy and for the images/s measurement
    warmup_batches: int = 3  # untimed batches before the images/s measurement
    timed_batches: int = 10  # timed batches; the median is reported
    fine_tune_epochs: int = 0  # the paper's protocol: fine-tune the head at each resolution first
    data: str | None = None  # override the checkpoint's data settings
    data_path: str | None = None  # the folder with validation/ (or val/), and train/ for --fine-tune-epochs; None: the checkpoint's
    workers: int | None = None  # data loader processes; None: the checkpoint's
    precision: str | None = None  # fp32 | bf16 | fp16; None: the checkpoint's
    channels_last: bool | None = None  # None: the checkpoint's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_prefix: str | None = None  # CSV/JSON path prefix, or a folder for sweep-<time>.*; None: <run folder>/sweep-<time>
    plot: str | None = None  # PNG file: accuracy vs images/s and vs GMACs
    progress: bool = True  # progress bars
    retain_host_memory: bool = True  # keep freed host memory for reuse (see training/host_memory.py)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job's stop, `timeout`), raised where Ctrl-C raises KeyboardInterrupt: the sweep
    stops alike, with exit code 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return validate(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def validate(argv: list[str] | None) -> int:
    try:
        args = parse_dataclass(list(sys.argv[1:] if argv is None else argv), ValidateConfig, ValidateConfig(),
                               __doc__)
        resolutions = parse_resolutions(args)
        check_args(args)
        # '~/runs/x', as run_train takes its paths (os.path's keeps a prefix's trailing '/', which names a folder)
        args = dataclasses.replace(args, **{name: getattr(args, name) and os.path.expanduser(getattr(args, name))
                                            for name in ("checkpoint", "plot", "output_prefix")})
        if args.retain_host_memory:
            retain_freed_memory()
        sources = check_sources(find_sources(Path(args.checkpoint)), args)
        prefix = output_prefix(args.output_prefix, sources[0])
        for target in [Path(f"{prefix}.csv")] + ([Path(args.plot)] if args.plot else []):
            check_writable(target, "--output-prefix / --plot")  # before the sweep, which a failed write at the end would lose
        rows = []
        try:
            for source in sources:
                sweep(source, args, resolutions, rows)
        except KeyboardInterrupt as stop:  # the points measured are kept, as after running out of memory
            print(f"interrupted after {len(rows)} point(s) of the sweep"
                  + ("; the points measured are written below" if rows else ""), file=sys.stderr)
            if rows:
                write_sweep(rows, prefix, args.plot)
            return 143 if isinstance(stop, Terminated) else 130
    except (ConfigError, CheckpointError, DataError, parallel.ParallelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        # the points measured so far are written: a sweep runs low to high, so they are the ones that fit
        print(f"error: out of memory after {len(rows)} point(s) of the sweep ({allocation_failed(error)}): "
              f"lower --batch-size or the largest resolution" + ("; the points measured are written below"
                                                                  if rows else ""), file=sys.stderr)
        if rows:
            write_sweep(rows, prefix, args.plot)
        return 1
    return write_sweep(rows, prefix, args.plot)


def write_sweep(rows: list[dict], prefix: Path, plot_path: str | None) -> int:
    """The table on stdout, CSV and JSON at the prefix, and the plot when asked for; 1 if a file
    could not be written (the table on stdout still holds every point)."""
    mark_best_and_pareto(rows)
    print(format_table(rows))
    try:
        write_outputs(rows, prefix)
        print(f"wrote {prefix}.csv and {prefix}.json", file=sys.stderr)
        if plot_path:
            plot(rows, Path(plot_path))
            print(f"wrote {plot_path}", file=sys.stderr)
    except WriteError as error:
        print(f"error: {error}; the table above holds every point measured", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- input


def parse_resolutions(args: ValidateConfig) -> list[int] | None:
    """The sweep's resolutions; None means the checkpoint's own test resolution."""
    if args.resolutions is not None and args.resolution_range is not None:
        raise ConfigError("give --resolutions or --resolution-range, not both")
    values: list[int] = []
    if args.resolutions is not None:
        try:
            values = [int(v) for v in args.resolutions.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--resolutions must be comma-separated integers, got {args.resolutions!r}") from None
        if not values:
            raise ConfigError("--resolutions is empty; give at least one, e.g. --resolutions 160,192,224")
    elif args.resolution_range is not None:
        try:
            start, stop, step = (int(v) for v in args.resolution_range.split(":"))
        except ValueError:
            raise ConfigError(f"--resolution-range must be START:STOP:STEP, got {args.resolution_range!r}") from None
        if step <= 0 or stop < start:
            raise ConfigError(f"--resolution-range {args.resolution_range} is empty (need STEP > 0 and STOP >= START)")
        values = list(range(start, stop + 1, step))
    else:
        return None
    low = [v for v in values if v < MIN_RESOLUTION]
    if low:
        raise ConfigError(f"resolution {low[0]} is below the model's minimum of {MIN_RESOLUTION} pixels")
    return sorted(set(values))


def check_args(args: ValidateConfig) -> None:
    if not args.checkpoint:
        raise ConfigError("--checkpoint PATH is required (a checkpoint file, .safetensors weights or a run folder)")
    if args.weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHTS)}, got {args.weights!r}")
    for name in ("batch_size", "timed_batches"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_batches < 0 or args.fine_tune_epochs < 0:
        raise ConfigError("--warmup-batches and --fine-tune-epochs must not be negative")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ConfigError(f"--plot must name a .png file, got {args.plot!r}")
    if args.output_prefix and not args.output_prefix.endswith(("/", "\\")) and not Path(args.output_prefix).name.strip():
        # (a shell variable holding a space wrote ' .csv' and ' .json' in the working folder)
        raise ConfigError(f"--output-prefix {args.output_prefix!r} ends in a blank name: give a path such as "
                          f"results/b0-sweep, or a folder")


def find_sources(path: Path) -> list[Path]:
    if path.is_dir():
        found = list_checkpoints(path)
        if not found and (path / "model.safetensors").is_file():  # a folder holding only the exported weights
            return [path / "model.safetensors"]
        if not found:
            raise no_weights_in(path)
        return found
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return [path]


def load_source(source: Path, args: ValidateConfig) -> tuple[TrainConfig, dict, list[str] | None]:
    """(config, weights, class names) of one file. This application's files carry their config;
    others (torchvision's or timm's ImageNet weights for a G1-BN model, a plain state dict) are
    given one with --config, and carry no class names: their classes are the validation folder's,
    in sorted order, as torchvision's ImageFolder numbers them."""
    if args.config is None:
        try:
            return load_weights(source, args.weights)
        except CheckpointError:
            foreign = _foreign_weights(source)
            if foreign is None:
                raise
            raise ConfigError(f"{source} holds {foreign.kind}, with no config of its own: give --config NAME "
                              f"for its model (torchvision's or timm's efficientnet_b0 … b7: efficientnet-b0-g1-bn "
                              f"… efficientnet-b7-g1-bn)") from None
    weights = read_initial_weights(source, "--checkpoint")
    if weights.kind in OWN_KINDS:
        raise ConfigError(f"--config is for weights without a config of their own; {source} ({weights.kind}) "
                          f"carries its config: leave --config out")
    if args.weights != "raw":
        raise MissingWeights(f"--weights {args.weights}: {source} ({weights.kind}) holds one set of weights; "
                             f"use --weights raw", ["raw"])
    cfg = named_config(args.config)
    outputs = classifier_outputs(weights)
    if outputs is None:
        raise ConfigError(f"--checkpoint {source} ({weights.kind}): no classifier weights found: not weights of "
                          f"an EfficientNet of this family")
    state, _ = fit_initial_weights(meta_model(dataclasses.replace(cfg, num_classes=outputs)), weights,
                                   "--checkpoint")
    return cfg, state, None


def _foreign_weights(source: Path):
    """The file as weights that carry no config of this application's (None if it is not that)."""
    try:
        weights = read_initial_weights(source, "--checkpoint")
    except ConfigError:
        return None
    return None if weights.kind in OWN_KINDS else weights


def check_sources(sources: list[Path], args: ValidateConfig) -> list[Path]:
    """The sources that load and hold the weights asked for, checked before the sweep, which would
    otherwise stop at a bad file after validating the ones before it. Of a run folder's
    checkpoints, those without these weights (a fine-tune phase keeps no averages) are left out,
    with a note; any other problem stops the run here."""
    weights = args.weights
    usable = []
    for source in sources:
        try:
            load_source(source, args)
        except MissingWeights as error:
            if len(sources) == 1:
                raise
            print(f"note: left out {source.name}: it holds no {weights} weights (it has: {', '.join(error.have)})",
                  file=sys.stderr)
            continue
        usable.append(source)
    if not usable:
        raise ConfigError(f"--weights {weights}: none of the {len(sources)} checkpoints in {sources[0].parent} "
                          f"holds them")
    return usable


# ---------------------------------------------------------------------------- the sweep


def sweep(source: Path, args: ValidateConfig, resolutions: list[int] | None, rows: list[dict]) -> None:
    """Appends one row per test resolution of `source` to `rows` as each is measured, so that the
    points done survive a failure at a later one."""
    cfg, state, classes = load_source(source, args)
    overrides = {name: getattr(args, name) for name in ("data", "data_path", "workers", "precision", "channels_last",
                                                        "crop_pct", "interpolation") if getattr(args, name) is not None}
    if (args.data or cfg.data) != "imagenet" and args.data_path is None:
        overrides["data_path"] = None  # the checkpoint's ImageNet folder is not read for --data demo/generated
    cfg = dataclasses.replace(cfg, **overrides, device=args.device, replicas=1, pipeline_splits=[],
                              progress=args.progress)
    check_config(cfg)
    unread = [option(name) for name in ("crop_pct", "interpolation") if getattr(args, name) is not None]
    if cfg.data == "generated" and unread:  # (they would be recorded in the sweep's rows, as if applied)
        raise ConfigError(f"{', '.join(unread)}: generated data is made at each test resolution, with no resize or "
                          f"crop to set")
    ctx = parallel.setup(cfg)
    device = ctx.device
    if args.fine_tune_epochs and not rows:  # (said once, before the first source's points)
        hint = run_train.cpu_fp16_hint(cfg, device)
        if hint:
            print(hint, file=sys.stderr)
    model = model_from_weights(cfg, state, source)
    num_classes = model.config.num_classes
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    resolutions = resolutions or [native_resolution(cfg)]
    check_shared_memory(cfg.workers, 1, batch_bytes(args.batch_size, max(resolutions)), "--workers or --batch-size")
    if classes is not None and len(classes) > num_classes:
        raise CheckpointError(f"{source}: it names {len(classes)} classes for {num_classes} outputs")
    # the validation folder alone: its class folders are labelled by the names saved with the model
    val_set = open_dataset(cfg, "validation", native_resolution(cfg), num_classes, trained=True,
                           trained_classes=classes)
    for resolution in resolutions:
        started = time.perf_counter()
        set_preprocessing(val_set, resolution, eval_transform(resolution, cfg.crop_pct, cfg.interpolation))
        loader = make_loader(val_set, args.batch_size, SeededSampler(len(val_set), cfg.seed, shuffle=False),
                             cfg.workers, device=device)
        tested = model
        if args.fine_tune_epochs:
            tested = copy.deepcopy(model)
            run_train.fine_tune(dataclasses.replace(cfg, fine_tune_epochs=args.fine_tune_epochs), tested,
                                num_classes, resolution, ctx, classes)
        result = evaluate(tested, loader, device, cfg.precision, cfg.channels_last, args.progress,
                          f"{source.name} @ {resolution}px")
        speed = inference_throughput(tested, args.batch_size, resolution, device, args.warmup_batches,
                                     args.timed_batches, cfg.channels_last,
                                     lambda: autocast_context(device, cfg.precision))
        memory = peak_memory_bytes(partial(_forward, tested, args.batch_size, resolution, device, memory_format),
                                   device)
        row = dict(
            checkpoint=str(source), config=cfg.config, weights=args.weights, resolution=resolution,
            crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, fine_tune_epochs=args.fine_tune_epochs,
            top1=result["top1"], top5=result["top5"], loss=result["loss"],
            images=result["images"], skipped=result["skipped"], images_per_s=speed["images_per_s"],
            batch_size=args.batch_size, gmacs=count_macs(tested, resolution) / 1e9,
            peak_memory_mb_per_image=memory / 1e6 / args.batch_size, device=str(device),
            seconds=time.perf_counter() - started,
        )
        rows.append(row)
        # a line per point as it is measured: a long sweep is not silent until its table
        print(f"{source.name} @ {resolution} px: top-1 {row['top1']:.2f} %, top-5 {row['top5']:.2f} %, "
              f"{row['images_per_s']:.1f} img/s ({row['seconds']:.0f} s)", file=sys.stderr)
    ctx.close()


def _forward(model: nn.Module, batch: int, resolution: int, device, memory_format) -> None:
    with torch.inference_mode():
        model(torch.zeros(batch, 3, resolution, resolution, device=device).contiguous(memory_format=memory_format))


def pareto_optimal(group: list[dict], cost: str) -> list[dict]:
    """Rows that no other row beats on both accuracy and `cost` (images_per_s: higher is better;
    gmacs: lower is better)."""
    sign = 1 if cost == "images_per_s" else -1

    def dominates(a: dict, b: dict) -> bool:
        better_or_equal = a["top1"] >= b["top1"] and sign * a[cost] >= sign * b[cost]
        return better_or_equal and (a["top1"] > b["top1"] or sign * a[cost] > sign * b[cost])

    return [row for row in group if not any(dominates(other, row) for other in group)]


def mark_best_and_pareto(rows: list[dict]) -> None:
    """Per checkpoint: the best-accuracy resolution, and the Pareto-optimal ones (no other
    resolution is both faster and more accurate)."""
    for checkpoint in {row["checkpoint"] for row in rows}:
        group = [row for row in rows if row["checkpoint"] == checkpoint]
        best = max(group, key=lambda row: row["top1"])
        front = {id(row) for row in pareto_optimal(group, "images_per_s")}
        for row in group:
            row["best"] = row is best
            row["pareto"] = id(row) in front


# ---------------------------------------------------------------------------- output


def format_table(rows: list[dict]) -> str:
    """The sweep as a terminal table; the first column is as wide as the longest file name, whole."""
    names = [Path(row["checkpoint"]).name for row in rows]
    width = max([len("checkpoint"), *map(len, names)])
    header = f"{'checkpoint':<{width}} {'res':>5} {'top-1 %':>8} {'top-5 %':>8} {'loss':>7} {'img/s':>9} " \
             f"{'GMACs':>8} {'MB/img':>8}  marks"
    lines = [header, "-" * len(header)]
    for name, row in zip(names, rows):
        marks = " ".join(m for m, on in (("best", row["best"]), ("pareto", row["pareto"])) if on)
        lines.append(
            f"{name:<{width}} {row['resolution']:>5} {row['top1']:>8.2f} {row['top5']:>8.2f} "
            f"{row['loss']:>7.4f} {row['images_per_s']:>9.1f} {row['gmacs']:>8.4f} "
            f"{row['peak_memory_mb_per_image']:>8.2f}  {marks}"
        )
    return "\n".join(lines)


def output_prefix(given: str | None, source: Path) -> Path:
    """Where the CSV/JSON go: `given` + .csv/.json; a folder (existing, or written with a trailing
    '/') gets sweep-<time>.* inside it; None: the checkpoint's run folder."""
    if given and not (given.endswith(("/", "\\")) or Path(given).is_dir()):
        return Path(given)
    folder = Path(given) if given else (source if source.is_dir() else source.parent)
    return folder / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def write_outputs(rows: list[dict], prefix: Path) -> None:
    """The sweep as CSV and JSON, each written atomically (a reader never sees half a file)."""
    write_csv(rows, Path(f"{prefix}.csv"))
    write_json(rows, Path(f"{prefix}.json"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    checkpoints = list(dict.fromkeys(row["checkpoint"] for row in rows))
    for index, checkpoint in enumerate(checkpoints):
        group = sorted((row for row in rows if row["checkpoint"] == checkpoint), key=lambda row: row["resolution"])
        colour = plt.cm.viridis(index / max(len(checkpoints) - 1, 1)) if len(checkpoints) > 1 else "tab:blue"
        label = Path(checkpoint).name
        for axis, key in zip(axes, ("images_per_s", "gmacs")):
            xs = [row[key] for row in group]
            axis.plot(xs, [row["top1"] for row in group], "o-", color=colour, label=label, alpha=0.8)
            for row in group:
                axis.annotate(f"{row['resolution']}px", (row[key], row["top1"]), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)
            front = sorted(pareto_optimal(group, key), key=lambda row: row[key])
            axis.plot([row[key] for row in front], [row["top1"] for row in front], "--", color=colour, linewidth=2.5,
                      alpha=0.5, label=f"Pareto front ({label})" if len(checkpoints) <= 3 else None)
            best = max(group, key=lambda row: row["top1"])
            axis.plot([best[key]], [best["top1"]], "*", color="red", markersize=15, zorder=5)
    device = rows[0]["device"]
    axes[0].set_xlabel(f"inference images/s (batch {rows[0]['batch_size']}, {device})")
    axes[1].set_xlabel("GMACs per image")
    axes[0].set_title("Top-1 accuracy vs throughput")
    axes[1].set_title("Top-1 accuracy vs compute")
    for axis in axes:
        axis.set_ylabel("top-1 accuracy (%)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    fig.suptitle("Test-resolution sweep (red star: best accuracy)")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:  # before or after the sweep: nothing is half-written (writes are atomic)
        print("interrupted", file=sys.stderr)
        sys.exit(143 if isinstance(stop, Terminated) else 130)
