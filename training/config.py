"""Run configuration: configs.yml (with inheritance) → TrainConfig dataclass → the code.

Precedence: command line > named config > dataclass defaults. Every field is a CLI option
(`--half-res-training`, `--lr 0.1`, ...). Problems raise ConfigError with one line naming the
option or config; the entry points print it and exit 2 before any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from datasets import INTERPOLATIONS
from models import FAMILY, create_model

CONFIGS_FILE = Path(__file__).resolve().parent.parent / "configs.yml"
MIN_RESOLUTION = 16  # below this, every stage from the third on sees 1x1 maps


class ConfigError(Exception):
    """A user error in a config file or an option; the message names it."""


@dataclass
class TrainConfig:
    """Everything a training run needs."""

    config: str | None = None  # named config from configs.yml (see --list-configs), or a YAML file of options

    # ---- model
    model: str = "efficientnet-b0"  # efficientnet-b0 ... efficientnet-b7
    group_size: int = 16  # channels per group of the spatial convs (1 = depthwise)
    expand_ratio: int = 4  # MBConv expansion ratio (6 for G1, 4 for G16)
    norm: str = "group"  # batch | group | layer
    norm_groups: int = 4  # groups for norm=group
    norm_eps: float | None = None  # None: 1e-3 for group/layer, 1e-5 for batch
    proxy_norm: bool = False  # Proxy Norm after GN/LN
    width: float | None = None  # width multiplier (None: the model's own)
    depth: float | None = None  # depth multiplier (None: the model's own)
    dropout: float | None = None  # classifier dropout (None: the model's own)
    stochastic_depth: float = 0.2  # drop-path rate of the last block
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute
    initial_weights: str | None = None  # start from these weights: a run's model.safetensors (or its folder) or checkpoint, or torchvision's or timm's EfficientNet file (G1-BN); a classifier of another size starts afresh

    # ---- data
    data: str = "imagenet"  # imagenet | generated | demo
    data_path: str | None = None  # folder with train/ and validation/ (or val/)
    num_classes: int | None = None  # None: the number of class folders (1000 for generated)
    resolution: int | None = None  # test (native) resolution; None: the model's
    half_res_training: bool = False  # train at half_resolution, then fine-tune at resolution
    half_resolution: int | None = None  # None: the paper's for the model, scaled as --resolution is
    train_resolution: int | None = None  # train at this resolution (overrides the above)
    crop_pct: float = 0.875  # test-time centre crop fraction (short side = res / crop_pct)
    interpolation: str = "bilinear"  # test-time resize: bilinear | bicubic (as torchvision's and timm's ImageNet weights were scored)
    min_crop_area: float = 0.05  # smallest area of the random-resized crop
    hflip: float = 0.5  # horizontal flip probability
    workers: int = 4  # DataLoader worker processes
    strict_images: bool = False  # an undecodable image stops the run instead of being skipped
    generated_size: int = 2048  # samples per epoch for --data generated

    # ---- optimisation
    epochs: int = 350  # training epochs (at the training resolution)
    micro_batch_size: int = 32  # samples per step on one replica
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    optimizer: str = "rmsprop"  # rmsprop (TF form) | sgd | adamw
    lr: float | None = None  # None: lr_per_image × global batch
    lr_per_image: float = 2.0**-14  # the paper's LR rule (0.046875 at batch 768)
    momentum: float = 0.9  # momentum of rmsprop and sgd
    nesterov: bool = False  # Nesterov momentum (sgd)
    rmsprop_decay: float = 0.953125  # rmsprop: decay of the mean square
    optimizer_eps: float = 1e-3  # rmsprop: inside the square root; adamw: its eps
    weight_decay: float = 1e-5  # conv/linear weights only
    proxy_weight_decay: float = 1e-5  # Proxy Norm's β̃, γ̃
    label_smoothing: float = 0.1  # of the cross-entropy targets
    warmup_epochs: float = 5.0  # linear LR warm-up from 0
    lr_schedule: str = "exponential"  # exponential | cosine
    lr_decay: float = 0.97  # exponential: factor ...
    lr_decay_epochs: float = 2.4  # ... every this many epochs
    mixup_alpha: float = 0.0  # 0 = off; coefficient ~ Beta(α, α)
    cutmix_lambda: float = 1.0  # share of the image kept by CutMix; 1.0 = off
    ema_decay: float = 0.0  # per-step EMA of the weights; 0 = off
    epoch_average_decay: float = 0.97  # the paper's average of per-epoch weights; 0 = off
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests, benchmarks)

    # ---- reduced-resolution fine-tuning
    fine_tune_epochs: int = 2  # after --half-res-training: epochs at the test resolution
    fine_tune_first_trainable_layer: str = "head"  # module path; everything before it is frozen
    fine_tune_lr_per_image: float = 0.25 / 512  # SGD, momentum 0, cosine
    fine_tune_batch_size: int | None = None  # None: micro_batch_size

    # ---- precision and speed
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False  # NHWC memory format for the model and its inputs
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    retain_host_memory: bool = True  # keep freed host memory for reuse (no per-step page faults)

    # ---- parallel (see parallel/)
    replicas: int = 1  # data-parallel replicas (under torchrun: world size = replicas × pipeline stages)
    pipeline_splits: list[str] = field(default_factory=list)  # module paths where a stage begins, separated by spaces or commas
    pipeline_schedule: str = "gpipe"  # gpipe | 1f1b

    # ---- run, checkpoints, logging
    seed: int = 0  # seeds the weights, the data order and the augmentation
    deterministic: bool = False  # deterministic kernels (exact resumes on CPU need no more)
    output_dir: str = "runs"  # where run folders are made
    run_name: str | None = None  # None: <config>-<date>-<time>
    resume: str | None = None  # checkpoint path, run folder, or "auto" (newest good checkpoint)
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0 = epochs only)
    keep_checkpoints: int = 3  # mid-epoch checkpoints kept, the newest
    keep_epoch_checkpoints: int = 0  # epoch-end checkpoints kept, the newest (0 = all)
    validate_every: int = 1  # validate every N epochs (0 = only at the end)
    skip_nonfinite_steps: int = 0  # tolerate this many NaN/Inf losses (skipped) before stopping
    progress: bool = True  # tqdm progress bars (shown on a terminal only)
    log_every: int = 100  # where no bar shows (a job's log file, --progress false): a line every N steps; 0 = none
    wandb: bool = False  # log to Weights & Biases (offline unless WANDB_API_KEY is set; WANDB_MODE, where set, decides)
    wandb_project: str = "efficientnet-g16"  # Weights & Biases project name
    stop_after_steps: int | None = None  # stop after this many steps in all, checkpointing as on SIGTERM

    def __post_init__(self) -> None:
        # "blocks.2.0,blocks.4.0" means two splits, as run_validate's --resolutions takes a comma list
        if isinstance(self.pipeline_splits, list) and all(isinstance(s, str) for s in self.pipeline_splits):
            self.pipeline_splits = [part.strip() for split in self.pipeline_splits
                                    for part in split.split(",") if part.strip()]


# Options that steer a run without changing what it computes: on --resume they come from the
# command line; every other option comes from the checkpoint's saved config.
# The device layout (replicas, pipeline stages) is one of them, so a checkpoint moves between layouts.
RUN_CONTROL = (
    "config", "resume", "stop_after_steps", "progress", "wandb", "wandb_project", "workers", "output_dir",
    "run_name", "checkpoint_every_steps", "keep_checkpoints", "keep_epoch_checkpoints", "log_every", "device",
    "replicas", "pipeline_splits", "pipeline_schedule", "retain_host_memory",
)

CHOICES: dict[str, tuple[str, ...]] = {
    "model": tuple(FAMILY),
    "norm": ("batch", "group", "layer"),
    "data": ("imagenet", "generated", "demo"),
    "optimizer": ("rmsprop", "sgd", "adamw"),
    "lr_schedule": ("exponential", "cosine"),
    "precision": ("fp32", "bf16", "fp16"),
    "pipeline_schedule": ("gpipe", "1f1b"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}
POSITIVE_INTS = ("micro_batch_size", "gradient_accumulation", "replicas", "group_size", "expand_ratio", "norm_groups")
NON_NEGATIVE = ("epochs", "workers", "fine_tune_epochs", "checkpoint_every_steps", "keep_epoch_checkpoints", "log_every",
                "validate_every", "warmup_epochs", "mixup_alpha", "weight_decay", "proxy_weight_decay",
                "skip_nonfinite_steps")
UNIT_INTERVAL = ("hflip",)  # [0, 1]
BELOW_ONE = ("ema_decay", "epoch_average_decay", "label_smoothing", "dropout", "stochastic_depth",  # [0, 1)
             "rmsprop_decay", "momentum")  # momentum 1 or more: each step's updates grow without end
SEEDS = 2**32  # seeds are 0 ... 2**32 - 1, as numpy's; the sampler derives larger ones from them
POSITIVE = ("width", "depth", "norm_eps", "lr_decay", "lr_decay_epochs", "optimizer_eps")  # > 0 (None: default)


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def options_given(arguments: list[str], names: list[str]) -> set[str]:
    """The fields (of `names`) that the command line sets, as argparse reads its options: a unique
    prefix (--resol for --resolution), --key=value, and simple-parsing's --noX for a false bool."""

    def field_of(token: str) -> str:
        key = token[2:].split("=", 1)[0].replace("-", "_")
        for candidate in (key, key.removeprefix("no").lstrip("_")):
            match = candidate if candidate in names else next((n for n in names if n.startswith(candidate)), None)
            if match:
                return match
        return key

    return {field_of(token) for token in arguments if token.startswith("--") and len(token) > 2}


def options_not_read(cfg: TrainConfig, given: set[str]) -> list[tuple[str, str]]:
    """(--option, why) for each option set on the command line that this run's other settings
    leave unread: it would otherwise change nothing without a word (--lr-decay with a cosine
    schedule, say)."""
    fine_tune = ("--fine-tune-epochs is 0" if cfg.fine_tune_epochs == 0 else
                 "this run trains at its test resolution, and the fine-tune phase follows training below it "
                 "(--half-res-training or --train-resolution)")
    unread = {
        "rmsprop_decay": (cfg.optimizer != "rmsprop", f"only --optimizer rmsprop reads it, not {cfg.optimizer}"),
        "optimizer_eps": (cfg.optimizer == "sgd", "--optimizer sgd has no eps"),
        "momentum": (cfg.optimizer == "adamw", "only --optimizer rmsprop and sgd read it, not adamw"),
        "lr_decay": (cfg.lr_schedule != "exponential", f"only --lr-schedule exponential reads it, not {cfg.lr_schedule}"),
        "lr_decay_epochs": (cfg.lr_schedule != "exponential",
                            f"only --lr-schedule exponential reads it, not {cfg.lr_schedule}"),
        "fine_tune_epochs": (cfg.fine_tune_epochs > 0 and not needs_fine_tune(cfg), fine_tune),
        "fine_tune_first_trainable_layer": (not needs_fine_tune(cfg), fine_tune),
        "fine_tune_lr_per_image": (not needs_fine_tune(cfg), fine_tune),
        "fine_tune_batch_size": (not needs_fine_tune(cfg), fine_tune),
        "pipeline_schedule": (not cfg.pipeline_splits, "it needs --pipeline-splits"),
        "wandb_project": (not cfg.wandb, "it needs --wandb"),
        "norm_groups": (cfg.norm != "group", f"only --norm group reads it, not {cfg.norm}"),
        "half_resolution": (not cfg.half_res_training or bool(cfg.train_resolution),
                            "--train-resolution sets the training resolution" if cfg.train_resolution
                            else "it needs --half-res-training"),
        "half_res_training": (cfg.half_res_training and bool(cfg.train_resolution),
                              "--train-resolution sets the training resolution"),
        "generated_size": (cfg.data != "generated", f"only --data generated reads it, not {cfg.data}"),
    }
    images = "--data generated makes its samples as tensors: no image files to decode, crop, flip or resize"
    unread.update({name: (cfg.data == "generated", images)
                   for name in ("strict_images", "min_crop_area", "hflip", "crop_pct", "interpolation")})
    return [(option(name), why) for name, (idle, why) in unread.items() if name in given and idle]


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def close_matches(word: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""


# ---------------------------------------------------------------------------- configs.yml


def read_yaml(path: Path) -> object:
    """A YAML file's data (safe_load: plain data only), with a ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None


def load_config_file(path: Path = CONFIGS_FILE) -> dict[str, dict]:
    data = read_yaml(path)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"config file {path} must map config names to mappings of options")
    return data


def config_names(path: Path = CONFIGS_FILE) -> list[str]:
    """Runnable configs; names starting with '_' are building blocks for `inherits`."""
    return [name for name in load_config_file(path) if not name.startswith("_")]


def parent_names(inherits: object, where: str) -> list[str]:
    """`inherits:` as a list of config names (one name alone is a list of one)."""
    names = [inherits] if isinstance(inherits, str) else inherits
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{where}: inherits must be a config name or a list of them, got {inherits!r}")
    return names


def resolve_config(name: str, path: Path = CONFIGS_FILE) -> dict[str, object]:
    """Options of a named config with its `inherits` chain applied (later parents win, own keys last)."""
    table = load_config_file(path)

    def resolve(current: str, chain: tuple[str, ...]) -> dict[str, object]:
        if current not in table:
            raise ConfigError(
                f"unknown config {current!r} in {path}{close_matches(current, [n for n in table if not n.startswith('_')])}"
            )
        if current in chain:
            raise ConfigError(f"config {current!r} in {path} inherits from itself: {' -> '.join(chain + (current,))}")
        entry = dict(table[current])
        merged: dict[str, object] = {}
        for parent in parent_names(entry.pop("inherits", []), f"config {current!r} in {path}"):
            merged.update(resolve(parent, chain + (current,)))
        merged.update(entry)
        return merged

    resolved = resolve(name, ())
    for key in resolved:
        if key not in field_names():
            raise ConfigError(f"config {name!r} in {path}: unknown option {key!r}{close_matches(key, field_names())}")
    resolved["config"] = name
    return resolved


def config_from_file(path: Path) -> TrainConfig:
    """`--config FILE.yaml`: a file of options, such as a run folder's `config.yaml` (to run that
    run again) or one of the user's own, which may name configs of configs.yml in `inherits`."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give a YAML file of options, such as a run folder's "
                          f"config.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must map options to values (e.g. `model: efficientnet-b0`)")
    parents = data.pop("inherits", None)
    if parents is None and data.get("config") in config_names():
        # `config: NAME` reads as `--config NAME` does: NAME's options, then the file's (it was a label
        # only, so `config: efficientnet-b2-g16-gn` + `epochs: 10` trained a B0). A run folder's
        # config.yaml sets every option, so there the name changes nothing.
        parents = data["config"]
    values: dict[str, object] = {}
    for parent in parent_names([] if parents is None else parents, f"config file {path}"):
        values.update(resolve_config(parent))
    values.update(data)
    values["config"] = data.get("config", path.stem)  # the file's own name for it, not a parent's
    return from_dict(values, f"config file {path}")


# ---------------------------------------------------------------------------- checking values


def _type_ok(value: object, annotation: object) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)  # type: ignore[arg-type]


# YAML 1.1's floats, which PyYAML reads, need a dot: it reads `lr: 1e-3` as the string '1e-3'
EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def make_config(values: dict[str, object], source: str = "config") -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    values = dict(values)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown option {key!r}{close_matches(key, list(hints))}")
        if isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value) and _type_ok(1.5, hints[key]):
            values[key] = value = float(value)  # a float option, written as YAML 1.2 and Python write it
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: option {key!r} must be {_describe(hints[key])}, got {value!r}")
    cfg = TrainConfig(**{k: float(v) if hints[k] is float else v for k, v in values.items()})  # type: ignore[arg-type]
    return cfg


def _describe(annotation: object) -> str:
    text = str(annotation).replace("typing.", "")
    return {"<class 'int'>": "an integer", "<class 'float'>": "a number", "<class 'bool'>": "true or false"}.get(
        text, text.replace("<class '", "").replace("'>", "")
    )


def check_config(cfg: TrainConfig) -> None:
    """Refuse impossible settings before any work starts."""
    for entry in dataclasses.fields(cfg):  # nan slips through every comparison below; inf through most
        value = getattr(cfg, entry.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{option(entry.name)} must be a finite number, got {value}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(
                f"{option(name)} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}"
                f"{close_matches(str(getattr(cfg, name)), list(choices))}"
            )
    for name in POSITIVE_INTS:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{option(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{option(name)} must not be negative, got {getattr(cfg, name)}")
    for name in UNIT_INTERVAL:
        value = getattr(cfg, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{option(name)} must be between 0 and 1, got {value}")
    for name in BELOW_ONE:
        value = getattr(cfg, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{option(name)} must be at least 0 and below 1, got {value}")
    for name in POSITIVE:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{option(name)} must be positive, got {value}")
    if not 0 <= cfg.seed < SEEDS:  # (a larger one overflowed the sampler's seed in the first epoch)
        raise ConfigError(f"--seed must be from 0 to {SEEDS - 1}, got {cfg.seed}")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ConfigError(f"--compile-mode {cfg.compile_mode} needs --compile true")
    if cfg.run_name is not None and (cfg.run_name.strip() in ("", ".", "..") or "/" in cfg.run_name
                                     or "\\" in cfg.run_name):
        # a path would put the run outside --output-dir (`..` into its parent, beside other runs' files);
        # a blank name (a shell variable holding a space) made a folder named ' '
        raise ConfigError(f"--run-name must be a folder name (no '/', not blank, '.' or '..'), got {cfg.run_name!r}; "
                          f"--output-dir says where run folders go")
    if not cfg.output_dir.strip():  # an unset shell variable: the runs would land in the working folder
        raise ConfigError("--output-dir is empty: name the folder for run folders ('.' for the current one)")
    if cfg.lr_decay > 1:
        raise ConfigError(f"--lr-decay is a factor in (0, 1], got {cfg.lr_decay}")
    if not 0.0 < cfg.cutmix_lambda <= 1.0:
        raise ConfigError(f"--cutmix-lambda must be in (0, 1] (1 = off), got {cfg.cutmix_lambda}")
    if not 0.0 < cfg.crop_pct <= 1.0:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {cfg.crop_pct}")
    if cfg.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"--interpolation must be {' or '.join(INTERPOLATIONS)}, got {cfg.interpolation!r}")
    if not 0.0 < cfg.min_crop_area <= 1.0:
        raise ConfigError(f"--min-crop-area must be in (0, 1], got {cfg.min_crop_area}")
    for name in ("resolution", "half_resolution", "train_resolution"):
        value = getattr(cfg, name)
        if value is not None and value < MIN_RESOLUTION:
            raise ConfigError(f"{option(name)} must be at least {MIN_RESOLUTION} pixels, got {value}")
    if cfg.half_res_training and not cfg.train_resolution and training_resolution(cfg) >= native_resolution(cfg):
        raise ConfigError(f"--half-res-training trains at {training_resolution(cfg)} px, not below the test "
                          f"resolution {native_resolution(cfg)} px: set --half-resolution below --resolution")
    for name in ("lr", "lr_per_image", "fine_tune_lr_per_image"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{option(name)} must be positive, got {value}")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):  # else it would be dropped without a word
        raise ConfigError(f"--nesterov is Nesterov momentum for --optimizer sgd with --momentum above 0, got "
                          f"--optimizer {cfg.optimizer} --momentum {cfg.momentum:g}")
    if cfg.proxy_norm and cfg.norm == "batch":
        raise ConfigError("--proxy-norm needs a batch-independent norm: use --norm group or --norm layer")
    if cfg.norm == "batch":
        check_batch_norm_statistics(cfg)
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise ConfigError(f"--num-classes must be at least 2, got {cfg.num_classes}")
    if cfg.data == "imagenet" and not cfg.data_path:
        raise ConfigError("--data imagenet needs --data-path DIR (a folder with train/ and validation/ or val/)")
    if cfg.data != "imagenet" and cfg.data_path:  # else the folder would be ignored without a word
        raise ConfigError(f"--data-path is read only with --data imagenet, but the data is {cfg.data!r}: "
                          f"add --data imagenet to use {cfg.data_path}")
    if cfg.data == "generated" and cfg.generated_size < 1:
        raise ConfigError(f"--generated-size must be at least 1, got {cfg.generated_size}")
    if cfg.fine_tune_batch_size is not None and cfg.fine_tune_batch_size < 1:
        raise ConfigError(f"--fine-tune-batch-size must be at least 1, got {cfg.fine_tune_batch_size}")
    if cfg.stop_after_steps is not None and cfg.stop_after_steps < 1:
        raise ConfigError(f"--stop-after-steps must be at least 1, got {cfg.stop_after_steps}")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be at least 1, got {cfg.keep_checkpoints}")
    if cfg.max_steps_per_epoch is not None and cfg.max_steps_per_epoch < 1:
        raise ConfigError(f"--max-steps-per-epoch must be at least 1, got {cfg.max_steps_per_epoch}")


def check_batch_norm_statistics(cfg: TrainConfig) -> None:
    """BatchNorm in training needs two values per channel: a micro-batch of one image fails on the
    last stage's 1x1 maps (32x downsampling), which it has at up to 32 px."""
    for batch, resolution, name in phase_batches(cfg):
        side = math.ceil(resolution / 32)
        if batch * side * side < 2:
            raise ConfigError(f"--norm batch needs more than one value per channel in training, but at {resolution} px "
                              f"the last feature maps are {side}x{side} and {name} is {batch}: raise {name}, "
                              f"train above 32 px, or use --norm group or --norm layer")


# ---------------------------------------------------------------------------- derived values


def native_resolution(cfg: TrainConfig) -> int:
    return cfg.resolution or FAMILY[cfg.model].resolution


def training_resolution(cfg: TrainConfig) -> int:
    if cfg.train_resolution:
        return cfg.train_resolution
    if cfg.half_res_training:
        return cfg.half_resolution or paper_half_resolution(cfg)
    return native_resolution(cfg)


def paper_half_resolution(cfg: TrainConfig) -> int:
    """The paper's half resolution for the model (B0: 160 for 224), in the same proportion to
    --resolution when that is not the model's native one (B0 at --resolution 112: 80, not 160)."""
    member = FAMILY[cfg.model]
    return max(MIN_RESOLUTION, round(member.half_resolution * native_resolution(cfg) / member.resolution))


def needs_fine_tune(cfg: TrainConfig) -> bool:
    """Reduced-resolution training: the head is fine-tuned at the test resolution afterwards."""
    return cfg.fine_tune_epochs > 0 and training_resolution(cfg) != native_resolution(cfg)


def fine_tune_micro_batch(cfg: TrainConfig) -> int:
    return cfg.fine_tune_batch_size or cfg.micro_batch_size


def phase_batches(cfg: TrainConfig) -> list[tuple[int, int, str]]:
    """(micro-batch, resolution, the option that sets the batch) of each training phase: the main
    one, then the fine-tuning at the test resolution when there is one."""
    phases = [(cfg.micro_batch_size, training_resolution(cfg), "--micro-batch-size")]
    if needs_fine_tune(cfg):
        phases.append((fine_tune_micro_batch(cfg), native_resolution(cfg), "--fine-tune-batch-size"))
    return phases


def global_batch_size(cfg: TrainConfig) -> int:
    return cfg.micro_batch_size * cfg.gradient_accumulation * cfg.replicas


def model_overrides(cfg: TrainConfig, num_classes: int) -> dict[str, object]:
    """The create_model() keyword arguments this config asks for."""
    overrides: dict[str, object] = dict(
        group_size=cfg.group_size,
        expand_ratio=cfg.expand_ratio,
        norm=cfg.norm,
        norm_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        proxy_norm=cfg.proxy_norm,
        stochastic_depth=cfg.stochastic_depth,
        grad_checkpointing=cfg.grad_checkpointing,
        num_classes=num_classes,
    )
    for name in ("width", "depth", "dropout"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    return overrides


def meta_model(cfg: TrainConfig) -> torch.nn.Module:
    """The config's model on the meta device (no memory, no arithmetic), to check before any work
    that it can be built: a model option that does not fit the network (norm groups that do not
    divide a layer, say) is a ConfigError here, not a traceback later."""
    try:
        with torch.device("meta"):
            return create_model(cfg.model, **model_overrides(cfg, cfg.num_classes or 1000))
    except ValueError as error:
        raise ConfigError(f"the model of this config cannot be built: {error}") from None


def to_dict(cfg: TrainConfig) -> dict[str, object]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, object], source: str) -> TrainConfig:
    """Rebuild a config saved in a run folder or checkpoint (unknown keys are an error).

    A data_path beside data other than imagenet was never read; versions before that pairing was
    refused saved it, so it is dropped here rather than refused in a run already made."""
    values = dict(values)
    if values.get("data", "imagenet") != "imagenet":
        values["data_path"] = None
    return make_config(values, source)


# ---------------------------------------------------------------------------- command line


def named_config(name: str) -> TrainConfig:
    """`--config`'s value as a config: a name in configs.yml, or a YAML file (.yaml, .yml)."""
    if name.endswith((".yaml", ".yml")):
        return config_from_file(Path(name).expanduser())
    if Path(name).expanduser().exists() and name not in load_config_file():
        raise ConfigError(f"--config {name}: not a name in {CONFIGS_FILE.name}, and a file of options must end in "
                          f".yaml or .yml (a run folder's config.yaml, say)")
    return make_config(resolve_config(name), f"config {name!r}")


def parse_args(argv: list[str] | None, description: str = "") -> TrainConfig:
    """Parse `argv` on top of `--config NAME`'s values. Raises ConfigError for user errors."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--list-configs", "--list_configs", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.list_configs:
        print("\n".join(config_names()))
        raise SystemExit(0)
    defaults = TrainConfig() if known.config is None else named_config(known.config)
    extra = [(("--list-configs",), dict(action="store_true", help="print the names in configs.yml and exit"))]
    cfg = parse_dataclass(argv, TrainConfig, defaults, description, extra)
    # a file's config is known by the name inside it (or its stem): run folders are named after it
    return dataclasses.replace(cfg, config=defaults.config) if known.config is not None else cfg


def _help_parser(dataclass_type: type, **kwargs) -> object:
    """simple-parsing's parser, with each option's help taken from its field's inline comment.

    simple-parsing prefers the comment above a field, which in these dataclasses is a section
    heading ("# ---- data"): the first option of each section would show the heading."""
    import simple_parsing
    from simple_parsing.docstring import get_attribute_docstring

    names = {f.name for f in dataclasses.fields(dataclass_type)}

    class HelpParser(simple_parsing.ArgumentParser):
        def format_help(self) -> str:
            for action in self._actions:
                name = action.dest.removeprefix("cfg.")
                if action.dest.startswith("cfg.") and name in names:
                    action.help = get_attribute_docstring(dataclass_type, name).comment_inline or None
                    if action.nargs == "*":  # a list: simple-parsing would show "list"
                        action.metavar = f"[{action.type.__name__} ...]"
            return super().format_help()

    return HelpParser(**kwargs)


def parse_dataclass(argv: list[str], dataclass_type: type, defaults: object, description: str = "",
                    extra_arguments: list | None = None) -> object:
    """simple-parsing over a dataclass, with user errors raised as ConfigError (close matches
    for unknown options, type errors naming the option)."""
    import argparse

    import simple_parsing

    parser = _help_parser(
        dataclass_type,
        description=description,
        add_option_string_dash_variants=simple_parsing.DashVariant.DASH,
        formatter_class=simple_parsing.SimpleHelpFormatter,
        exit_on_error=False,
    )
    for names, kwargs in extra_arguments or []:
        parser.add_argument(*names, **kwargs)
    parser.add_arguments(dataclass_type, dest="cfg", default=defaults)
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise ConfigError(str(error)) from None
    if unknown:
        options = [s for action in parser._actions for s in action.option_strings]
        first = next((u for u in unknown if u.startswith("-")), unknown[0])
        if not first.startswith("-"):  # a word no option took: `run_train.py demo`, `--resolutions 32, 40`
            raise ConfigError(f"unexpected argument {first!r}: options are written --name VALUE, and a value "
                              f"with a space in it needs quotes")
        raise ConfigError(f"unknown option {first}{close_matches(first.split('=')[0], options)}")
    cfg = args.cfg
    hints = typing.get_type_hints(dataclass_type)
    for f in dataclasses.fields(cfg):
        if not _type_ok(getattr(cfg, f.name), hints[f.name]):
            raise ConfigError(f"option {option(f.name)} must be {_describe(hints[f.name])}, got {getattr(cfg, f.name)!r}")
    return cfg
