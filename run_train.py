"""Train an EfficientNet with the paper's recipe, then validate it.

    python run_train.py --config demo                    # the built-in digits: a minute on a CPU
    python run_train.py --config efficientnet-b2-g16-gn --data-path /data/imagenet
    python run_train.py --config efficientnet-b0-g16-lnpn --data-path /data/imagenet --half-res-training
    torchrun --nproc-per-node 4 run_train.py --config demo --replicas 4     # data parallel

One command does the whole paper recipe: train (at half resolution with --half-res-training),
average the weights, fine-tune the head at the test resolution with test-time preprocessing, and
validate. Options are taken from the command line, then the named config (`--list-configs` lists
them), then the defaults below.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import parallel
from datasets import (
    DataError,
    RandomCropDecoder,
    SeededSampler,
    batch_bytes,
    check_classes,
    check_shared_memory,
    data_root,
    eval_transform,
    make_loader,
    some_names,
    train_transform,
)
from datasets.shared_memory import loader_failure
from models import create_model
from training.averaging import make_average
from training.checkpoint import (
    CheckpointError,
    WriteError,
    atomic_write,
    checkpoint_name,
    export_safetensors,
    is_epoch_end,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from training.config import (
    RUN_CONTROL,
    ConfigError,
    TrainConfig,
    check_config,
    field_names,
    fine_tune_micro_batch,
    from_dict,
    global_batch_size,
    meta_model,
    model_overrides,
    native_resolution,
    needs_fine_tune,
    option,
    options_given,
    options_not_read,
    parse_args,
    phase_batches,
    to_dict,
    training_resolution,
)
from training.data import class_names, open_dataset, set_preprocessing
from training.evaluate import autocast_context, evaluate
from training.finetune import check_layer_name, freeze_before, train_mode
from training.host_memory import retain_freed_memory
from training.initial_weights import InitialWeights, fit_initial_weights, load_initial_weights, read_initial_weights
from training.metrics import METRICS_FILES, MetricsLog
from training.mixing import BatchMixer
from training.optim import LRSchedule, optimizer_from_config, parameter_groups
from training.out_of_memory import allocation_failed, is_out_of_memory
from training.run_dir import RunLock, locate_run, remove_if_empty, write_config
from training.trained import eval_preprocessing


class TrainingError(Exception):
    """The run cannot go on (e.g. a non-finite loss); the message says where and why."""


class StopRequested(Exception):
    """SIGTERM/SIGINT (or --stop-after-steps): a checkpoint was written; exit cleanly."""

    def __init__(self, code: int, checkpoint: Path | None) -> None:
        super().__init__(code)
        self.code = code
        self.checkpoint = checkpoint


@dataclass
class Phase:
    """One stretch of training: the main run, or the fine-tune at the test resolution."""

    name: str  # "train" | "fine_tune"
    epochs: int
    resolution: int
    micro_batch_size: int
    test_preprocessing: bool  # fine-tuning trains on test-time crops
    mixer: BatchMixer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    frozen: list[nn.Module] = field(default_factory=list)
    ema: nn.Module | None = None
    epoch_average: nn.Module | None = None


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    phase: str = "train"
    epoch: int = 0  # epochs finished in this phase
    micro_batch: int = 0  # micro-batches consumed in the current epoch
    step: int = 0  # optimizer steps in the whole run
    nonfinite_skipped: int = 0

    def where(self) -> str:
        """Where a resumed run picks up, in the 1-based epochs the logs print."""
        phase, done = self.phase, self.micro_batch
        if done:
            micro_batches = f"{done} micro-batch{'' if done == 1 else 'es'}"
            return f"in {phase} epoch {self.epoch + 1}, {micro_batches} into it, step {self.step}"
        if self.epoch:
            return f"after {phase} epoch {self.epoch}, step {self.step}"
        return f"at the start of the {phase} phase, step {self.step}"


def main(argv: list[str] | None = None) -> int:
    ctx = None
    lock = None
    created = None  # the run folder, when this process made it: removed again if a failure leaves it empty
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(arguments, description=__doc__)
        check_config(cfg)
        check_before_work(cfg)
        if cfg.retain_host_memory:
            retain_freed_memory()
        ctx = parallel.setup(cfg)
        run_dir, state, state_path = find_run(cfg, ctx)
        if state is not None and (run_dir / "final.json").is_file():  # written last: the run is complete
            ctx.print(f"run {run_dir} has already finished: results in final.json, weights in model.safetensors")
            changed = settings_not_applied(cfg, from_dict(state["config"], f"config saved in {state_path}"))
            if changed:  # e.g. --epochs raised to train on: a finished run is not reopened
                ctx.print(f"note: {', '.join(changed)} not applied to the finished run; to train on from its weights, "
                          f"start a new run with --initial-weights {run_dir}")
            return 0
        if state is not None:
            cfg = config_for_resume(cfg, state, state_path, ctx.print)
            check_before_work(cfg)
        initial = None
        if state is None and cfg.initial_weights:  # (a resume takes its weights from the checkpoint)
            initial = read_initial_weights(cfg.initial_weights)
            fit_initial_weights(meta_model(cfg), initial)
        # the checkpoint's data folder when resuming: --data-path is not run control
        check_data_folder(cfg, state, state_path)
        check_loader_memory(cfg, ctx)
        if state is None:  # (a resume names what it ignores in its own warning)
            for name, why in options_not_read(cfg, options_given(arguments, field_names())):
                ctx.print(f"note: {name} is not read by this run: {why}")
        if ctx.is_main:
            created = None if run_dir.exists() else run_dir
        lock = ctx.run_on_main(partial(take_run_folder, run_dir))
        with parallel.deterministic_kernels(cfg.deterministic):
            return train(cfg, ctx, run_dir, state, state_path, initial)
    except parallel.MainRankFailed as failed:  # rank 0 has said why
        return 1 if failed.error_type == WriteError.__name__ else 2
    except (ConfigError, DataError, CheckpointError, parallel.ParallelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except WriteError as error:
        if ctx is None or ctx.is_main:  # under torchrun every rank stops with rank 0's reason: say it once
            print(f"error: {error}. What was already written is kept (a checkpoint being replaced stays whole): "
                  f"make room, then continue with --resume auto.", file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        explained = loader_failure(error)
        if explained:
            print(f"error: {explained}. Checkpoints already written are kept: continue with --resume auto.",
                  file=sys.stderr)
            return 1
        if not is_out_of_memory(error):
            raise
        print(f"error: out of memory ({allocation_failed(error)}): lower --micro-batch-size (raise "
              f"--gradient-accumulation to keep the global batch) or --resolution, or add --grad-checkpointing. "
              f"Checkpoints already written are kept: continue with --resume auto.", file=sys.stderr)
        return 1
    except StopRequested as stop:
        where = f"; checkpoint {stop.checkpoint}" if stop.checkpoint else ""
        if ctx is None or ctx.is_main:  # every rank stops together: say it once
            print(f"stopped{where}. Continue with the same command and --resume auto.", file=sys.stderr)
        return stop.code
    finally:
        if lock is not None:
            lock.release()
        if created is not None:
            remove_if_empty(created)
        if ctx is not None:
            ctx.close()


def find_run(cfg: TrainConfig, ctx: parallel.Context) -> tuple[Path, dict | None, Path | None]:
    """Rank 0 picks the run folder and checkpoint; the others follow its choice (shared filesystem),
    or stop with it when it refuses one."""
    found = ctx.run_on_main(partial(locate_run, cfg, report=ctx.print))
    if ctx.is_main:
        run_dir, state, state_path = found
        choice = [str(run_dir), str(state_path) if state_path else None]
    else:
        choice = [None, None]
    choice = ctx.broadcast_from_main(choice)
    if ctx.is_main:
        return found
    state_path = Path(choice[1]) if choice[1] else None
    return Path(choice[0]), load_checkpoint(state_path) if state_path else None, state_path


def take_run_folder(run_dir: Path) -> RunLock:
    """The run folder, made if new, locked against a second training process."""
    lock = RunLock(run_dir)
    lock.acquire()
    return lock


def config_for_resume(cfg: TrainConfig, state: dict, path: Path, report) -> TrainConfig:
    """The checkpoint's config, with run-control options from the command line."""
    saved = from_dict(state["config"], f"config saved in {path}")
    if cfg.replicas != saved.replicas:  # the pipeline layout may change on resume; the replicas may not
        raise ConfigError(
            f"{path} was trained with --replicas {saved.replicas} (global batch {global_batch_size(saved)}); "
            f"resuming with --replicas {cfg.replicas} would change the global batch, the LR and the data order "
            f"of the epoch: resume with --replicas {saved.replicas}")
    ignored = settings_not_applied(cfg, saved)
    if ignored:
        report(f"warning: resuming with the checkpoint's settings; ignoring {', '.join(ignored)}")
    return dataclasses.replace(saved, **{name: getattr(cfg, name) for name in RUN_CONTROL})


def settings_not_applied(cfg: TrainConfig, saved: TrainConfig) -> list[str]:
    """The options, as --names, where the command line differs from the checkpoint's config and a
    resume keeps the checkpoint's (all but run control)."""
    return [option(f.name) for f in dataclasses.fields(cfg)
            if f.name not in RUN_CONTROL and getattr(cfg, f.name) != getattr(saved, f.name)]


def check_before_work(cfg: TrainConfig) -> None:
    """Everything that can be checked without reading data: the model's layers and the layout."""
    model = meta_model(cfg)
    if cfg.fine_tune_epochs > 0:
        check_layer_name(model, cfg.fine_tune_first_trainable_layer)
    parallel.check_layout(cfg, model)


def check_data_folder(cfg: TrainConfig, state: dict | None = None, state_path: Path | None = None) -> None:
    """The data folder's splits and classes (no image is read): checked after the options, whose
    errors are the ones to report first, and before the run folder is made, so that a wrong
    --data-path leaves nothing behind. A resume goes on with the classes it was trained on: by
    name where the checkpoint saved them, and in number (its classifier's outputs) in any case."""
    root = data_root(cfg.data, cfg.data_path)
    if root is None:
        return
    classes = check_classes(root)
    if state is None:
        return
    remedy = f"resume on the same data, or start a new run from its weights with --initial-weights {state_path}"
    saved = state.get("classes")
    if saved is not None and classes != saved:
        added, gone = sorted(set(classes) - set(saved)), sorted(set(saved) - set(classes))
        raise DataError(f"the class folders under {root} are not those {state_path.name} was trained on "
                        f"(new: {some_names(added) or 'none'}; gone: {some_names(gone) or 'none'}): {remedy}")
    outputs = state["model"]["classifier.1.weight"].shape[0]
    if (cfg.num_classes or len(classes)) != outputs:
        raise DataError(f"{root} has {len(classes)} classes, but {state_path.name} was trained with {outputs} "
                        f"outputs: {remedy}")


def cpu_fp16_hint(cfg: TrainConfig, device: torch.device) -> str | None:
    """fp16 training on a CPU: PyTorch's fp16 convolution backward there runs 100-2000x slower than
    bf16's (docs/benchmarks.md A.10), so a run meant for a GPU's fp16 would crawl without a word."""
    if device.type != "cpu" or cfg.precision != "fp16":
        return None
    return ("note: on a CPU, PyTorch's fp16 convolution backward is 100-2000x slower than bf16's: B0 G16-LN+PN at "
            "160 px trained at 0.4 img/s in fp16 against 44 in bf16 on an Intel Xeon with AVX512-FP16 "
            "(docs/benchmarks.md A.10); use --precision bf16")


def speed_hint(cfg: TrainConfig, device: torch.device) -> str | None:
    """A note where the settings are known to be slow on this device and a user would not know:
    fp16 on a CPU (above), or Proxy Norm trained eagerly on a GPU, where its many small kernels keep
    the GPU waiting on the host: CUDA graphs issue a whole step at once (docs/benchmarks.md C.8,
    C.11). The configs' defaults are the CPU's fastest, so a GPU user would otherwise not know."""
    if device.type == "cpu":
        return cpu_fp16_hint(cfg, device)
    if device.type != "cuda" or not cfg.proxy_norm or cfg.pipeline_splits:  # a pipeline cannot be compiled
        return None
    if cfg.compile and cfg.compile_mode == "reduce-overhead":
        return None
    return ("note: on a GPU, eager Proxy Norm waits on kernel launches; with --compile true --compile-mode "
            "reduce-overhead (CUDA graphs), B2 G16-LN+PN trained 3.1x faster than eager on an H100 "
            "(docs/benchmarks.md C.11)")


def check_loader_memory(cfg: TrainConfig, ctx: parallel.Context) -> None:
    """The loader workers' batches in flight against free shared memory, for every rank on this host."""
    sizes = [batch_bytes(batch, resolution) for batch, resolution, _ in phase_batches(cfg)]
    sizes.append(batch_bytes(cfg.micro_batch_size, native_resolution(cfg)))  # validation
    check_shared_memory(cfg.workers, ctx.local_world_size, max(sizes), "--workers or --micro-batch-size")


def train(cfg: TrainConfig, ctx: parallel.Context, run_dir: Path, state: dict | None, state_path: Path | None,
          initial: InitialWeights | None = None) -> int:
    device = ctx.device
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    # ---- data (the class list decides the classifier size)
    native = native_resolution(cfg)
    val_set = open_dataset(cfg, "validation", native)
    set_preprocessing(val_set, native, eval_preprocessing(cfg))  # as the exported weights are prepared
    num_classes = cfg.num_classes or len(val_set.classes)
    if num_classes < len(val_set.classes):  # the labels of the last folders would be out of the classifier's range
        raise ConfigError(f"--num-classes {num_classes} is fewer than the {len(val_set.classes)} classes of the data: "
                          f"leave it out to use one output per class folder")
    val_sampler = SeededSampler(len(val_set), cfg.seed, False, ctx.replica_rank, ctx.replicas, pad=False)
    val_loader = make_loader(val_set, cfg.micro_batch_size, val_sampler, cfg.workers, device=device)
    train_set = open_dataset(cfg, "train", training_resolution(cfg))
    # each phase's batch against the data, before anything is written (fine-tuning comes after hours of training)
    for batch, _, name in phase_batches(cfg):
        steps_per_epoch(cfg, len(train_set), batch, ctx, name)

    # ---- model: the same initial weights on every rank, then a different RNG stream per rank
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **model_overrides(cfg, num_classes)).to(device, memory_format=memory_format)
    if initial is not None:
        ctx.print(load_initial_weights(model, initial))
    runner = parallel.wrap(model, cfg, ctx)
    scaler = make_scaler(cfg, device)
    seed_everything(cfg.seed + ctx.rank)

    def open_run_files() -> MetricsLog:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            write_config(run_dir, to_dict(cfg))
        # a fresh start empties what a failed start left; a resume drops what followed its checkpoint
        keep_bytes = dict.fromkeys(METRICS_FILES, 0) if state is None else state.get("metrics_bytes")
        return MetricsLog(run_dir, to_dict(cfg), cfg.wandb, cfg.wandb_project, keep_bytes)

    log = ctx.run_on_main(open_run_files)  # rank 0 writes; a failure there stops every rank
    ctx.print(f"run folder: {run_dir}")
    ctx.print(
        f"{cfg.model} g{cfg.group_size} e{cfg.expand_ratio} {cfg.norm}{'+pn' if cfg.proxy_norm else ''}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {num_classes} classes, "
        f"train at {training_resolution(cfg)} px, test at {native} px, global batch {global_batch_size(cfg)}"
    )

    hint = speed_hint(cfg, device)
    if hint:
        ctx.print(hint)

    progress = Progress()
    if state is not None:
        progress = Progress(**state["progress"])
        ctx.print(f"resuming from {state_path} ({progress.where()})")

    validated = None  # (result, what it was) of the current weights, where this process validated them
    with SignalStopper(ctx.print) as stopper:
        # ---- main training phase
        phase = make_train_phase(cfg, model, num_classes, len(train_set), ctx)
        if progress.phase == "train":
            if state is not None:
                restore(state, model, phase, scaler, cfg, ctx)
            validated = last_epoch(run_phase(cfg, ctx, phase, model, runner, scaler, train_set, val_loader, progress,
                                             run_dir, log, stopper))
            # the weights the run goes on from: the paper's epoch average, else the EMA (labelled as
            # run_validate's --weights names them); with both kept, the EMA is validated too
            for label, average, what in (("ema", phase.ema, "the EMA weights"),
                                         ("averaged", phase.epoch_average, "the epoch-averaged weights")):
                if average is not None:
                    model.load_state_dict(runner.full_state(average.module))
                    validated = (report_validation(cfg, ctx, log, progress, model, runner, val_loader, label), what)

        # ---- fine-tune the head at the test resolution (reduced-resolution training)
        if needs_fine_tune(cfg):
            runner = None  # its DDP reducer expects gradients for every parameter: drop it (and its hooks)
            gc.collect()
            phase = make_fine_tune_phase(cfg, model, num_classes, len(train_set), ctx)
            runner = parallel.wrap(model, cfg, ctx)  # over the trainable parameters only
            if progress.phase == "train":
                progress = dataclasses.replace(progress, phase="fine_tune", epoch=0, micro_batch=0)
            elif state is not None:
                restore(state, model, phase, scaler, cfg, ctx)
            validated = last_epoch(run_phase(cfg, ctx, phase, model, runner, scaler, train_set, val_loader, progress,
                                             run_dir, log, stopper))

    if validated is not None:
        # nothing has changed these weights since they were validated: a second pass over the
        # validation set (50,000 images for ImageNet) would only repeat it
        final = record_validation(ctx, log, progress, validated[0], "final", f"{validated[1]}, validated above")
    else:
        final = report_validation(cfg, ctx, log, progress, model, runner, val_loader, "final")
    if ctx.is_main:
        metadata = {"config": json.dumps(to_dict(cfg)), "num_classes": str(num_classes)}
        classes = class_names(train_set)
        if classes is not None:  # the class folder names, by output index
            metadata["classes"] = json.dumps(classes)
        export_safetensors(model.state_dict(), run_dir / "model.safetensors", metadata)
        summary = json.dumps(dict(final, step=progress.step, resolution=native), indent=2)
        log.close()
        if log.failure is not None:  # the final validation's records: the run is not done until they are written
            raise log.failure
        atomic_write(run_dir / "final.json", lambda handle: handle.write(summary.encode()))  # last: marks the run done
    ctx.print(f"final: top-1 {final['top1']:.2f} %, top-5 {final['top5']:.2f} % at {native} px; weights: "
              f"{run_dir / 'model.safetensors'}")
    return 0


# ---------------------------------------------------------------------------- phases


def make_train_phase(cfg: TrainConfig, model: nn.Module, num_classes: int, train_size: int,
                     ctx: parallel.Context) -> Phase:
    resolution = training_resolution(cfg)
    steps = steps_per_epoch(cfg, train_size, cfg.micro_batch_size, ctx)
    lr = cfg.lr or cfg.lr_per_image * global_batch_size(cfg)
    optimizer = optimizer_from_config(cfg, model, lr)
    schedule = LRSchedule(cfg.lr_schedule, steps, max(cfg.epochs * steps, 1), round(cfg.warmup_epochs * steps),
                          cfg.lr_decay, cfg.lr_decay_epochs)
    return Phase(
        name="train",
        epochs=cfg.epochs,
        resolution=resolution,
        micro_batch_size=cfg.micro_batch_size,
        test_preprocessing=False,
        mixer=BatchMixer(num_classes, cfg.mixup_alpha, cfg.cutmix_lambda),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        steps_per_epoch=steps,
        ema=make_average(model, cfg.ema_decay),
        epoch_average=make_average(model, cfg.epoch_average_decay),
    )


def make_fine_tune_phase(cfg: TrainConfig, model: nn.Module, num_classes: int, train_size: int,
                         ctx: parallel.Context) -> Phase:
    """SGD without momentum, cosine LR, mixing off, layers before the named one frozen."""
    frozen = freeze_before(model, cfg.fine_tune_first_trainable_layer)
    micro_batch = fine_tune_micro_batch(cfg)
    steps = steps_per_epoch(cfg, train_size, micro_batch, ctx, "--fine-tune-batch-size")
    lr = cfg.fine_tune_lr_per_image * micro_batch * cfg.gradient_accumulation * ctx.replicas
    optimizer = torch.optim.SGD(parameter_groups(model, cfg.weight_decay, cfg.proxy_weight_decay), lr=lr, momentum=0.0)
    schedule = LRSchedule("cosine", steps, max(cfg.fine_tune_epochs * steps, 1))
    return Phase(
        name="fine_tune",
        epochs=cfg.fine_tune_epochs,
        resolution=native_resolution(cfg),
        micro_batch_size=micro_batch,
        test_preprocessing=True,
        mixer=BatchMixer(num_classes),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        steps_per_epoch=steps,
        frozen=frozen,
    )


def fine_tune(cfg: TrainConfig, model: nn.Module, num_classes: int, resolution: int, ctx: parallel.Context,
              classes: list[str] | None = None) -> None:
    """The paper's fine-tune of the head at `resolution` with test-time preprocessing, in place
    (`classes`: the model's saved class names, which label the training images).
    run_validate.py calls this for its per-resolution protocol: a pass that is not resumed, so it
    writes no checkpoints, and Ctrl-C stops it at once (KeyboardInterrupt)."""
    cfg = dataclasses.replace(cfg, resolution=resolution, checkpoint_every_steps=0, stop_after_steps=None,
                              validate_every=0)
    train_set = open_dataset(cfg, "train", resolution, num_classes, trained=True, trained_classes=classes)
    phase = make_fine_tune_phase(cfg, model, num_classes, len(train_set), ctx)
    scaler = make_scaler(cfg, ctx.device)
    runner = parallel.wrap(model, cfg, ctx)
    # no SignalStopper: there is no checkpoint to stop at
    run_phase(cfg, ctx, phase, model, runner, scaler, train_set, None, Progress(phase="fine_tune"), None, None, None)
    for param in model.parameters():
        param.requires_grad_(True)
    model.eval()


def run_phase(cfg, ctx, phase: Phase, model, runner, scaler, train_set, val_loader, progress: Progress,
              run_dir: Path | None, log, stopper: SignalStopper | None) -> dict | None:
    """Epochs of one phase, from wherever `progress` says the run is (checkpoints in `run_dir`;
    None: none written; `stopper` None: signals are not caught). Returns the validation of the
    weights the phase ended with, where its last epoch was validated (else None)."""
    ended_with = None
    classes = class_names(train_set)  # saved in each checkpoint
    set_phase_preprocessing(train_set, cfg, phase)
    sampler = SeededSampler(len(train_set), cfg.seed + (1000 if phase.name == "fine_tune" else 0), True,
                            ctx.replica_rank, ctx.replicas)
    device = ctx.device
    loader = make_loader(train_set, phase.micro_batch_size, sampler, cfg.workers, drop_last=True,
                         device=device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    accumulation = cfg.gradient_accumulation
    settings = step_settings(cfg, device, scaler)
    bars_shown = cfg.progress and sys.stderr.isatty()  # on rank 0, on a terminal; otherwise a line now and then

    while progress.epoch < phase.epochs:
        epoch = progress.epoch
        sampler.set_epoch(epoch, start=progress.micro_batch * phase.micro_batch_size)
        train_mode(model, phase.frozen)
        started = time.perf_counter()
        seen = skipped = 0
        # summed on the device and read at the epoch's end: reading them each step would make the
        # host wait for the GPU every step instead of queueing the next one (float64: the same sums
        # as Python's floats)
        correct = torch.zeros((), dtype=torch.long, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        window_losses: list[torch.Tensor] = []
        bar = tqdm(total=phase.steps_per_epoch, initial=progress.micro_batch // accumulation,
                   desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                   disable=not (bars_shown and ctx.is_main),
                   leave=False, dynamic_ncols=True)
        for images, labels, skipped_files in loader:
            if progress.micro_batch // accumulation >= phase.steps_per_epoch:
                break
            for item in skipped_files:
                ctx.print(f"warning: skipped undecodable image {item.path} ({item.reason})")
            skipped += len(skipped_files)
            progress.micro_batch += 1
            final_micro = progress.micro_batch % accumulation == 0
            if labels.numel():
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                inputs, targets = mix(phase.mixer, images, labels, cfg.seed, ctx.replica_rank, progress)
                done = runner.micro_step(inputs, targets, final_micro, settings)
                for loss, logits, target in done:
                    window_losses.append(loss)
                    hard = target.argmax(1) if target.ndim == 2 else target
                    correct += (logits.argmax(1) == hard).sum()
                    seen += hard.numel()
                    loss_sum += loss.double() * hard.numel()
            elif final_micro:  # no image decoded: the window still ends, with this replica in its all-reduce
                blank = torch.zeros(1, 3, phase.resolution, phase.resolution, device=device)
                runner.micro_step(None, None, True, settings, blank.contiguous(memory_format=memory_format))
            if not final_micro:
                continue

            # ---- optimizer step
            bad = nonfinite_values(window_losses)  # the step's one wait for the device
            if ctx.any_rank(bool(bad)):
                handle_nonfinite(cfg, ctx, phase, progress, bad, run_dir)
            else:
                scaler.step(phase.optimizer)
                scaler.update()
                if phase.ema is not None:
                    phase.ema.update_parameters(model)
            phase.optimizer.zero_grad(set_to_none=True)
            phase.scheduler.step()
            window_losses = []
            progress.step += 1
            bar.update(1)
            # this replica's running means; reading the sums waits for the device, so only where shown
            step_in_epoch = progress.micro_batch // accumulation
            line_due = (not bars_shown and ctx.rank == ctx.loss_rank and cfg.log_every
                        and step_in_epoch % cfg.log_every == 0)
            if seen and (not bar.disable or line_due):
                loss, top1 = float(loss_sum) / seen, 100 * int(correct) / seen
                images_per_s = seen * ctx.replicas / (time.perf_counter() - started)
                lr = phase.optimizer.param_groups[0]["lr"]
                if line_due:  # a job's log gets a line now and then instead of a bar
                    ctx.print(f"{phase.name} epoch {epoch + 1}/{phase.epochs} step {step_in_epoch}/"
                              f"{phase.steps_per_epoch}: loss {loss:.4f}, train top-1 {top1:.2f} %, "
                              f"{images_per_s:.1f} img/s, lr {lr:.3e}", rank=ctx.loss_rank)
                else:
                    bar.set_postfix(loss=f"{loss:.3f}", top1=f"{top1:.1f}", img_s=f"{images_per_s:.1f}", lr=f"{lr:.2e}")
            # mid-epoch checkpoints (the epoch's last step is checkpointed at the end of the epoch)
            stop_code = stop_requested(cfg, ctx, stopper, progress)
            periodic = cfg.checkpoint_every_steps and progress.step % cfg.checkpoint_every_steps == 0
            if (stop_code or periodic) and progress.micro_batch // accumulation < phase.steps_per_epoch:
                path = write_checkpoint(cfg, ctx, run_dir, model, phase, scaler, progress, False, runner, log,
                                        classes)
                if stop_code:
                    raise StopRequested(stop_code, path)
        bar.close()

        # ---- end of epoch
        elapsed = time.perf_counter() - started
        totals = ctx.all_reduce_sum([seen, int(correct), float(loss_sum), skipped])
        progress.epoch += 1
        progress.micro_batch = 0
        if phase.epoch_average is not None:
            phase.epoch_average.update_parameters(model)
        record = dict(event="epoch", phase=phase.name, epoch=progress.epoch, step=progress.step,
                      resolution=phase.resolution, lr=phase.optimizer.param_groups[0]["lr"],
                      train_loss=totals[2] / max(totals[0], 1), train_top1=100.0 * totals[1] / max(totals[0], 1),
                      images_per_s=totals[0] / elapsed, skipped_images=int(totals[3] // ctx.stages), seconds=elapsed)
        last = progress.epoch == phase.epochs
        due = (cfg.validate_every and progress.epoch % cfg.validate_every == 0) or (last and phase.name == "train")
        if due and val_loader is not None:
            result = validate(cfg, ctx, model, runner, val_loader)
            ended_with = result if last else None
            record.update(val_top1=result["top1"], val_top5=result["top5"], val_loss=result["loss"], val_weights="raw")
            train_mode(model, phase.frozen)
        if log is not None:
            log.log(record)
        skipped = record["skipped_images"]
        ctx.print(
            f"{phase.name} epoch {progress.epoch}/{phase.epochs}: loss {record['train_loss']:.4f}, "
            f"train top-1 {record['train_top1']:.2f} %, {record['images_per_s']:.1f} img/s"
            + (f", val top-1 {record['val_top1']:.2f} % top-5 {record['val_top5']:.2f} %" if "val_top1" in record else "")
            + (f", {skipped} image{'' if skipped == 1 else 's'} skipped" if skipped else "")
        )
        path = write_checkpoint(cfg, ctx, run_dir, model, phase, scaler, progress, True, runner, log, classes)
        stop_code = stop_requested(cfg, ctx, stopper, progress)
        if stop_code and not (last and phase.name == "fine_tune"):
            raise StopRequested(stop_code, path)
    return ended_with


def stop_requested(cfg: TrainConfig, ctx, stopper: SignalStopper | None, progress: Progress) -> int:
    """Exit code to stop with (0: go on). Decided together by all ranks, so they stop at the same step."""
    code = stopper.code if stopper is not None else 0
    if not code and cfg.stop_after_steps and progress.step >= cfg.stop_after_steps:
        code = 143
    if ctx.any_rank(code != 0):
        return code or 143
    return 0


def nonfinite_values(losses: list[torch.Tensor]) -> list[float]:
    """The losses that are NaN or infinite, read from the device in one transfer."""
    if not losses:
        return []
    stacked = torch.stack(losses)
    finite = stacked.isfinite()
    return [] if bool(finite.all()) else stacked[~finite].tolist()


def handle_nonfinite(cfg, ctx, phase: Phase, progress: Progress, bad_losses: list[float], run_dir: Path) -> None:
    """Skip the step while --skip-nonfinite-steps allows; otherwise stop with the step named."""
    bad = bad_losses[0] if bad_losses else float("nan")
    progress.nonfinite_skipped += 1
    where = f"{phase.name} epoch {progress.epoch + 1}, step {progress.step + 1}"
    if progress.nonfinite_skipped > cfg.skip_nonfinite_steps:
        saved = list_checkpoints(run_dir) if run_dir is not None else []
        raise TrainingError(
            f"loss is {bad} at {where}; stopping. Last good checkpoint: "
            f"{saved[-1] if saved else 'none yet'}. Lower the LR, use --precision fp32, or allow skips with "
            f"--skip-nonfinite-steps N"
        )
    ctx.print(f"warning: loss is {bad} at {where}; step skipped "
              f"({progress.nonfinite_skipped}/{cfg.skip_nonfinite_steps} allowed)")


def step_settings(cfg: TrainConfig, device: torch.device, scaler) -> parallel.StepSettings:
    """How one micro-batch is trained: mean cross-entropy (label smoothing) in fp32, under autocast."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)

    return parallel.StepSettings(loss_fn, scaler, lambda: autocast_context(device, cfg.precision),
                                 cfg.gradient_accumulation)


def mix(mixer: BatchMixer, images, labels, seed: int, replica: int, progress: Progress):
    """Mixup/CutMix under a seed of its own (run seed, replica, position in the run), so every
    pipeline stage of a replica mixes the same way and the training RNG stream is untouched."""
    if not mixer.active:
        return images, labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}/{replica}/{progress.phase}/{progress.epoch}/{progress.micro_batch}".encode()))
        return mixer(images, labels)


# ---------------------------------------------------------------------------- checkpoints


def write_checkpoint(cfg, ctx, run_dir: Path, model, phase: Phase, scaler, progress: Progress,
                     epoch_end: bool, runner, log: MetricsLog | None, classes: list[str] | None) -> Path | None:
    """Every rank joins in (pipeline stages merge their slices); rank 0 writes atomically.
    `classes`: the class folder names, by output index (None for generated data)."""
    if run_dir is None:  # a pass that is never resumed (run_validate's fine-tuning)
        return None
    state = dict(
        model=runner.full_state(model),
        optimizer=runner.full_optimizer_state(phase.optimizer),
        scheduler=phase.scheduler.state_dict(),
        scaler=scaler.state_dict(),
        ema=runner.full_state(phase.ema) if phase.ema is not None else None,
        epoch_average=runner.full_state(phase.epoch_average) if phase.epoch_average is not None else None,
        progress=dataclasses.asdict(progress),
        rng=ctx.all_gather_object(rng_state()),  # every rank's stream (dropout, drop-path), by rank
        config=to_dict(cfg),
        classes=classes,
        metrics_bytes=log.sizes() if log is not None else None,  # a resume cuts the metrics files back to these
    )
    path, failed = None, [None]
    if ctx.is_main:
        name = checkpoint_name(progress.step, phase.name, progress.epoch) if epoch_end else checkpoint_name(progress.step)
        path = run_dir / name
        try:
            if log is not None and log.failure is not None:  # a metrics file: the disk is full already
                raise log.failure
            save_checkpoint(path, state)
            prune_checkpoints(run_dir, cfg.keep_checkpoints, cfg.keep_epoch_checkpoints)
            if epoch_end:
                warn_if_checkpoints_outgrow_disk(cfg, phase, progress, path, ctx.print)
        except WriteError as error:
            failed = [str(error)]
    failed = ctx.broadcast_from_main(failed)  # a full disk stops every rank with rank 0's reason, not a lost peer
    if failed[0] is not None:
        raise WriteError(failed[0])
    return path


def warn_if_checkpoints_outgrow_disk(cfg: TrainConfig, phase: Phase, progress: Progress, written: Path,
                                     report) -> None:
    """At a run's first epoch checkpoint, whose size is now known: if every epoch's is kept, will
    they fit on the disk? (B0 G16-LN+PN's are 91 MiB: 31 GiB over the paper's 350 epochs.)"""
    if cfg.keep_epoch_checkpoints or sum(map(is_epoch_end, list_checkpoints(written.parent))) != 1:
        return
    due = phase.epochs - progress.epoch + (cfg.fine_tune_epochs if phase.name == "train" and needs_fine_tune(cfg) else 0)
    size, free = written.stat().st_size, shutil.disk_usage(written.parent).free
    if due * size > free:
        report(f"warning: each epoch checkpoint takes {size_text(size)} and {due} more are due "
               f"({size_text(due * size)}), but {written.parent} has {size_text(free)} free: "
               f"--keep-epoch-checkpoints N keeps only the newest N (it may be given on --resume too)")


def size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def restore(state: dict, model: nn.Module, phase: Phase, scaler, cfg: TrainConfig, ctx) -> None:
    model.load_state_dict(state["model"])
    phase.optimizer.load_state_dict(state["optimizer"])
    phase.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for name in ("ema", "epoch_average"):
        average = getattr(phase, name)
        if average is not None and state.get(name) is not None:
            average.load_state_dict(state[name])
    saved = state["rng"]
    ranks = saved if isinstance(saved, list) else [saved]  # checkpoints before 2026-11-26 kept rank 0's only
    if ctx.rank < len(ranks):
        set_rng_state(ranks[ctx.rank])
    else:  # more ranks than the run that wrote it (a pipeline resumed with more stages): a stream of its own
        seed_everything(zlib.crc32(f"{cfg.seed}/{ctx.rank}/{state['progress']['step']}".encode()))


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------------------- helpers


def set_phase_preprocessing(train_set, cfg: TrainConfig, phase: Phase) -> None:
    """Training crops for the main phase (JPEGs decoded at a reduced scale where the crop keeps its
    output's pixels); for fine-tuning, the validation images' preprocessing at the test resolution,
    full decode included, so that it trains on exactly what will be tested."""
    if phase.test_preprocessing:
        set_preprocessing(train_set, phase.resolution,
                          eval_transform(phase.resolution, cfg.crop_pct, cfg.interpolation))
    else:
        set_preprocessing(train_set, phase.resolution,
                          train_transform(phase.resolution, cfg.min_crop_area, cfg.hflip, crop=False),
                          RandomCropDecoder(phase.resolution, cfg.min_crop_area))


def steps_per_epoch(cfg: TrainConfig, dataset_length: int, micro_batch: int, ctx: parallel.Context,
                    batch_option: str = "--micro-batch-size") -> int:
    per_rank = math.ceil(dataset_length / ctx.replicas)
    steps = per_rank // micro_batch // cfg.gradient_accumulation
    if steps < 1:
        raise ConfigError(
            f"the training set ({dataset_length} images over {ctx.replicas} replica(s)) is smaller than one global "
            f"batch of {micro_batch * cfg.gradient_accumulation * ctx.replicas}; lower {batch_option} or "
            f"--gradient-accumulation"
        )
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def validate(cfg, ctx, model, runner, loader) -> dict:
    """Top-1/top-5/loss of the current weights (every pipeline stage's part synced), over all replicas."""
    runner.sync_model()
    return ctx.reduce_eval(evaluate(model, loader, ctx.device, cfg.precision, cfg.channels_last))


def last_epoch(result: dict | None) -> tuple[dict, str] | None:
    """run_phase's validation of the weights it ended with, labelled for the final report."""
    return None if result is None else (result, "the last epoch's weights")


def report_validation(cfg, ctx, log, progress: Progress, model, runner, loader, label: str) -> dict:
    return record_validation(ctx, log, progress, validate(cfg, ctx, model, runner, loader), label)


def record_validation(ctx, log, progress: Progress, result: dict, label: str, note: str = "") -> dict:
    """Print and log one validation of the `label` weights (`note`: where the result came from)."""
    ctx.print(f"validation ({label} weights{': ' + note if note else ''}): top-1 {result['top1']:.2f} %, "
              f"top-5 {result['top5']:.2f} %, loss {result['loss']:.4f}")
    if log is not None:
        log.log(dict(event="validation", weights=label, step=progress.step, **result))
    return result


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (starting at 128, as the paper); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, init_scale=128.0, enabled=cfg.precision == "fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class SignalStopper:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits.
    `report`: where to say so (under torchrun, rank 0's `Context.print`: every rank gets the signal)."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.code = 0
        self.report = report
        self.previous = {}
        for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            try:
                self.previous[signum] = signal.signal(signum, lambda *_ , c=code: self._request(c))
            except ValueError:  # not the main thread
                pass

    def _request(self, code: int) -> None:
        if self.code:  # a second signal: stop now
            raise KeyboardInterrupt
        self.code = code
        self.report("stop requested: writing a checkpoint at the next step")

    def __enter__(self) -> SignalStopper:
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
