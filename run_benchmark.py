"""Throughput of models and of the host data loader, measured side by side in one process.

    python run_benchmark.py --compare efficientnet-b0-g1-bn@224 efficientnet-b0-g16-gn@224 \\
        efficientnet-b0-g16-lnpn@224 efficientnet-b0-g16-lnpn@160 --batch-size 32
    python run_benchmark.py --mode inference --compare efficientnet-b0-g16-lnpn@224+bf16+cl
    python run_benchmark.py --mode data --resolution 160 --workers 1      # host loader on JPEGs

The first row is run once untimed before anything is measured (a process's first work is slow).
A row is CONFIG[@RES][+fp32|+bf16|+fp16][+cl|+nocl][+compile|+nocompile][+KEY=VALUE…] or
timm:MODEL[@RES] with the same flags but no KEY=VALUE. KEY is a run_train option of the model, its
optimizer or its loss (e.g. proxy_norm=false); one that changes nothing a row times, such as
micro_batch_size, is refused, as is a setting given twice (+bf16+fp16, @224+resolution=160).
Precision, memory format and compile default to the config's (+compile+compile_mode=reduce-overhead
picks torch.compile's mode, as --compile-mode does). Each row runs warm-up steps (not timed), then
timed steps each synchronised and timed alone; the median is reported with GMACs per image, achieved
GFLOP/s (a training step counted as 3 forward passes), that as a share of this machine's matmul peak
(measured here first), and peak memory per image (n/a for compiled rows on CPU, where it is counted
by a dispatch mode that runs the eager code), and the ATen operators a step runs, views excluded (on
a GPU, about its kernel launches; n/a for compiled rows).
Ratios are against the first row. `--rounds N` builds all rows first and cycles through them N
times, so that a shared machine's drift falls on every row alike; a "per round" column then shows
the lowest and highest ratio of one round's medians, the noise left on the ratio.
`--profile-calls N` then profiles N more steps of each row with torch.profiler and prints, after
the table, where the time went: the operators (on a GPU, kernels) with the most self time, and on
a GPU the share of the wall time it was busy, which tells launch-bound from compute-bound.
`--results-file PATH.json|PATH.csv` also writes the figures, with what reproducing them needs (date,
command, git commit, processor, threads, versions, device, matmul peaks, settings). Record results
in docs/benchmarks.md with the command, machine and date; timed tests are not used because shared
machines are noisy.
"""

from __future__ import annotations

import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets import DataError, batch_bytes, check_shared_memory
from models import create_model
from models.flops import count_macs
from parallel.context import ParallelError, pick_device, tune_for_device
from training.checkpoint import WriteError
from training.config import (
    MIN_RESOLUTION,
    ConfigError,
    TrainConfig,
    check_config,
    make_config,
    meta_model,
    model_overrides,
    native_resolution,
    option,
    options_given,
    parse_dataclass,
    resolve_config,
)
from training.evaluate import autocast_context
from training.host_memory import retain_freed_memory
from training.measure import median_step_seconds, operators_per_call, peak_memory_bytes, profile_summary
from training.optim import optimizer_from_config
from training.results import TABLE_SUFFIXES, check_writable, write_csv, write_json


@dataclass
class BenchmarkConfig:
    """What to measure and how."""

    compare: list[str] = field(default_factory=lambda: ["efficientnet-b0-g16-lnpn"])  # rows, see above
    mode: str = "train"  # train | inference | data
    batch_size: int = 32  # images per step (and per loader batch in data mode)
    warmup_steps: int = 2  # untimed steps before each row's (or round's) timed ones
    timed_steps: int = 5  # timed steps per row and round; the median is reported
    rounds: int = 1  # >1: cycle through all rows this many times, rows interleaved (models kept in memory)
    round_time_limit: float = 0.0  # seconds: no new round starts after this long (0: none); the table covers the rounds done
    profile_calls: int = 0  # >0: profile this many more steps of each row and print where their time went
    profile_rows: int = 15  # operators (kernels on a GPU) listed per profiled row
    results_file: str | None = None  # .json or .csv: the figures, with the machine, settings and commit
    threads: int | None = None  # torch intra-op threads (None: PyTorch's default)
    retain_host_memory: bool = True  # keep freed host memory for reuse (see training/host_memory.py)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    num_classes: int = 1000  # classifier size of the benchmarked models
    # ---- data mode
    data_path: str | None = None  # an ImageNet-style folder (its train/ is read) or a folder of class folders; None: generate ImageNet-like JPEGs
    jpegs: int = 64  # images to generate when no --data-path
    resolution: int = 160  # training crop for the data mode
    workers: int = 1  # DataLoader workers for the data mode
    draft: bool = True  # JPEGs decoded at a reduced scale where the crop keeps enough pixels


@dataclass
class Row:
    spec: str
    config: str
    resolution: int
    precision: str | None = None  # None: the config's (fp32 for timm rows)
    channels_last: bool | None = None  # None: the config's
    compile: bool | None = None
    compile_mode: str = "default"  # the config's --compile-mode (+compile_mode=MODE)
    overrides: dict = field(default_factory=dict)
    timm_model: str | None = None
    checked: TrainConfig | None = None  # the config once check_row has passed it (None for timm rows)


def parse_row(spec: str) -> Row:
    head, *flags = spec.split("+")
    name, _, res = head.partition("@")
    if res and not res.isdigit():
        raise ConfigError(f"row {spec!r}: resolution after @ must be a positive whole number of pixels, got {res!r}")
    if res and int(res) < MIN_RESOLUTION:  # 0 would read as "not given", the config's resolution
        raise ConfigError(f"row {spec!r}: resolution after @ must be at least {MIN_RESOLUTION} pixels")
    row = Row(spec, name, int(res) if res else 0)
    if name.startswith("timm:"):
        row.timm_model = name[5:]
        row.resolution = row.resolution or 224
    given: dict[str, str] = {"resolution": f"@{res}"} if res else {}  # setting -> the flag that set it

    def setting(key: str, flag: str) -> None:  # one setting set twice (+bf16+fp16, @224+resolution=160) is refused
        if key in given:
            raise ConfigError(f"row {spec!r}: {given[key]} and {flag} both set {key}: give it once")
        given[key] = flag

    for flag in flags:
        if flag in ("bf16", "fp16", "fp32"):
            setting("precision", flag)
            row.precision = flag
        elif flag in ("cl", "nocl"):
            setting("channels_last", flag)
            row.channels_last = flag == "cl"
        elif flag in ("compile", "nocompile"):
            setting("compile", flag)
            row.compile = flag == "compile"
        elif "=" in flag:
            key, value = flag.split("=", 1)
            setting(key, flag)
            row.overrides[key] = _parse_value(value)
        else:
            raise ConfigError(f"row {spec!r}: unknown flag {flag!r} (fp32, bf16, fp16, cl, nocl, compile, "
                              f"nocompile or KEY=VALUE)")
    return row


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


# The options a row's step is built from: the model, its resolution, precision, layout and compilation,
# and the optimizer and loss it trains with. Any other option (data, schedule, batch, replicas and
# pipeline stages, run folder) changes nothing a row times, so a row that sets one is refused
ROW_OPTIONS = (
    "model", "group_size", "expand_ratio", "norm", "norm_groups", "norm_eps", "proxy_norm", "width", "depth",
    "dropout", "stochastic_depth", "grad_checkpointing", "resolution", "precision", "channels_last", "compile",
    "compile_mode", "optimizer", "momentum", "nesterov", "rmsprop_decay", "optimizer_eps", "weight_decay",
    "proxy_weight_decay", "label_smoothing",
)


def check_row(row: Row, batch_size: int | None = None):
    """The row's training config, checked (None for a timm row): unknown configs, options and
    timm models are refused here, before anything is measured. With `batch_size` (training rows),
    the step the row will time is checked too, at the row's resolution and that batch."""
    if row.timm_model:
        if row.overrides:
            raise ConfigError(f"row {row.spec!r}: a timm row takes @RES and the precision, layout and compile "
                              f"flags only, not {', '.join(row.overrides)}")
        try:
            import timm
        except ImportError:
            raise ConfigError(f"row {row.spec!r}: timm is not installed (pip install timm)") from None
        if row.timm_model not in timm.list_models():
            raise ConfigError(f"row {row.spec!r}: timm has no model {row.timm_model!r}")
        return None
    # the row's flags override the config as options would, and are checked with it (e.g. +compile
    # for --compile-mode)
    flags = {name: value for name, value in (("precision", row.precision), ("channels_last", row.channels_last),
                                             ("compile", row.compile)) if value is not None}
    cfg = make_config({**resolve_config(row.config), "data": "generated", **flags, **row.overrides}, f"row {row.spec!r}")
    unused = [key for key in row.overrides if key not in ROW_OPTIONS]
    if unused:
        raise ConfigError(
            f"row {row.spec!r}: {', '.join(unused)} would change nothing this benchmark times (one process, "
            f"--batch-size images a step, at @RES); a row takes the model's options, precision, channels_last, "
            f"compile, compile_mode and the optimizer's"
        )
    timed = cfg if batch_size is None else replace(cfg, micro_batch_size=batch_size, resolution=row.resolution or cfg.resolution,
                                                      train_resolution=None, half_res_training=False)
    try:
        check_config(timed)
        meta_model(cfg)
    except ConfigError as error:
        message = str(error) if batch_size is None else str(error).replace("--micro-batch-size", "--batch-size")
        raise ConfigError(f"row {row.spec!r}: {message}") from None
    row.checked = cfg
    return cfg


def build(row: Row, num_classes: int) -> tuple[torch.nn.Module, object]:
    cfg = row.checked or check_row(row)  # a config row was checked at start-up; a timm row is looked up again
    if row.timm_model:
        import timm

        row.precision = row.precision or "fp32"
        row.channels_last = bool(row.channels_last)
        row.compile = bool(row.compile)
        return timm.create_model(row.timm_model, pretrained=False, num_classes=num_classes), None
    row.resolution = row.resolution or native_resolution(cfg)
    row.precision, row.channels_last, row.compile, row.compile_mode = (cfg.precision, cfg.channels_last, cfg.compile,
                                                                       cfg.compile_mode)
    return create_model(cfg.model, **model_overrides(cfg, num_classes)), cfg


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best of several large square matmuls: the machine's practical dense peak. A GPU needs
    large ones: at 2048 its launch and sync overheads rival the arithmetic."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = median_step_seconds(lambda: a @ b, device, warmup=2, timed=repeats)
    return 2 * size**3 / min(times) / 1e9


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


@dataclass
class Prepared:
    """One row ready to run: its model built, and `step` running one training or inference step."""

    row: Row
    step: Callable[[], None]
    gmacs: float
    passes: int  # forward-pass equivalents per step, for GFLOP/s
    times: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)  # the median step of each round


def check_compiled_rows(rows: list[Row], rounds: int) -> None:
    """Interleaved rounds keep every row's compiled graph at once, all entries of one function's cache
    (the model's forward), which Dynamo caps: past the cap, a row would run eagerly while named compiled."""
    compiled = sum(bool(row.checked.compile if row.checked else row.compile) for row in rows)
    if rounds == 1 or compiled < 2:
        return
    import torch._dynamo  # only where rows are compiled: Dynamo takes a while to import

    limit = torch._dynamo.config.recompile_limit
    if compiled > limit:
        raise ConfigError(f"--compare has {compiled} compiled rows, and with --rounds {rounds} all of them stay "
                          f"compiled at once; torch.compile keeps at most {limit} graphs of a model's forward "
                          f"(torch._dynamo.config.recompile_limit) and would run the rest eagerly. Use --rounds 1, "
                          f"or compare at most {limit} compiled rows")


def eager_copy(row: Row) -> Row:
    """The row, not compiled (its checked config too, from which `build` fills the row in)."""
    checked = row.checked and replace(row.checked, compile=False, compile_mode="default")
    return replace(row, compile=False, compile_mode="default", checked=checked)


def prepare_row(row: Row, args: BenchmarkConfig, device: torch.device) -> Prepared:
    torch.manual_seed(0)
    model, cfg = build(row, args.num_classes)
    memory_format = torch.channels_last if row.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    macs = count_macs(model, row.resolution) / 1e9
    # dynamic=False: each row's graph is traced for its own sizes. Otherwise a compiled row after another of
    # other sizes (a resolution, or a G1 model's weights after a G16 one's) would meet that row's cache entry,
    # and Dynamo would trace a shape-generic graph: not the program a run of the row alone would time
    forward = torch.compile(model, mode=row.compile_mode, dynamic=False) if row.compile else model
    x = torch.randn(args.batch_size, 3, row.resolution, row.resolution, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=row.precision == "fp16")

    if args.mode == "train":
        model.train()
        smoothing = cfg.label_smoothing if cfg is not None else 0.1  # timm's recipe uses 0.1 too
        if cfg is not None:
            optimizer = optimizer_from_config(cfg, model, 0.01)
        else:
            optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9, eps=1e-3)

        def step() -> None:
            with autocast_context(device, row.precision):
                loss = F.cross_entropy(forward(x).float(), y, label_smoothing=smoothing)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        return Prepared(row, step, macs, passes=3)  # forward + backward (about twice the forward)

    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast_context(device, row.precision):
            forward(x)

    return Prepared(row, step, macs, passes=1)


def result_of(prepared: Prepared, args: BenchmarkConfig, device: torch.device) -> dict:
    """The row's figures from all its timed steps (the median), and its peak memory."""
    row = prepared.row
    # on CPU, live tensors are counted by a dispatch mode, under which a compiled model runs its
    # eager code: that count would be the eager model's, so none is reported for compiled rows. With
    # CUDA graphs, a step's tensors live in the graphs' private pool, allocated in the warm-up: the
    # allocator's peak during a timed step leaves them out (0.6 MB/img on an H100, against 10.8 for
    # the same model compiled without graphs), so none is reported for those rows either
    unmeasured = row.compile and (device.type != "cuda" or row.compile_mode in CUDA_GRAPH_MODES)
    memory = None if unmeasured else peak_memory_bytes(prepared.step, device)
    operators = None if row.compile else operators_per_call(prepared.step)  # compiled: its eager ops
    median = statistics.median(prepared.times)
    images_per_s = args.batch_size / median
    return dict(row=row.spec, resolution=row.resolution, precision=row.precision, channels_last=row.channels_last,
                compile=row.compile, compile_mode=row.compile_mode, images_per_s=images_per_s, median_step_s=median, timed_steps=len(prepared.times),
                round_medians=prepared.round_medians,
                gmacs=prepared.gmacs,
                gflops=2 * prepared.gmacs * prepared.passes * images_per_s,
                peak_mb_per_image=None if memory is None else memory / 1e6 / args.batch_size,
                operators_per_step=operators)


def benchmark_rows(rows: list[Row], args: BenchmarkConfig, device: torch.device) -> list[dict]:
    """Time every row. With one round, each row is built, measured and freed in turn; with more,
    all are built first and the rounds cycle through them, so that a shared machine's drift over
    minutes falls on every row alike (each round repeats the row's warm-up steps)."""
    started = time.perf_counter()

    def report(what: str) -> None:  # on stderr: where a long or stuck comparison is
        print(f"# {time.perf_counter() - started:.0f} s: {what}", file=sys.stderr, flush=True)

    if args.rounds == 1:
        results = []
        for row in rows:
            prepared = prepare_row(row, args, device)
            prepared.times = median_step_seconds(prepared.step, device, args.warmup_steps, args.timed_steps)
            results.append(result_of(prepared, args, device))
            report(f"measured {row.spec}: {results[-1]['images_per_s']:.1f} img/s")  # kept if a timeout cuts the table
            profile_row(prepared, results[-1], args, device)
            del prepared
            if row.compile:  # free its graphs (and CUDA graphs' pool); the next row's compile starts afresh
                torch.compiler.reset()
        return results
    prepared_rows = []
    for row in rows:
        prepared_rows.append(prepare_row(row, args, device))
        report(f"built {row.spec}")
    for round_number in range(args.rounds):
        if round_number and args.round_time_limit and time.perf_counter() - started > args.round_time_limit:
            report(f"round time limit reached: {round_number} of {args.rounds} rounds done")
            break
        for prepared in prepared_rows:
            times = median_step_seconds(prepared.step, device, args.warmup_steps, args.timed_steps)
            prepared.times += times
            prepared.round_medians.append(statistics.median(times))
            report(f"round {round_number + 1}: {prepared.row.spec}: {args.batch_size / prepared.round_medians[-1]:.1f} img/s")
    results = [result_of(prepared, args, device) for prepared in prepared_rows]
    for prepared, result in zip(prepared_rows, results):
        profile_row(prepared, result, args, device)
    return results


def profile_row(prepared: Prepared, result: dict, args: BenchmarkConfig, device: torch.device) -> None:
    """With --profile-calls, the row's profile summary goes into its result (printed after the table)."""
    if args.profile_calls:
        result["profile"] = profile_summary(prepared.step, device, args.profile_calls, args.profile_rows)


def round_ratios(first: list[float], row: list[float]) -> tuple[float, float, float] | None:
    """(lowest, median, highest) speed ratio of a row against the first row, each round's medians
    compared with the same round's. The median is the ratio least moved by a shared machine's
    drift (a slow spell slows both rows of its round); the range is the spread the drift leaves.
    None without interleaved rounds."""
    if len(first) < 2 or len(first) != len(row):
        return None
    ratios = [a / b for a, b in zip(first, row)]
    return min(ratios), statistics.median(ratios), max(ratios)


# ---------------------------------------------------------------------------- host data loader


def make_jpegs(folder: Path, count: int) -> Path:
    """ImageNet-like JPEGs (about 500x375, smooth colour fields with noise) in two class folders."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        width, height = (500, 375) if index % 3 else (375, 500)
        coarse = torch.rand(3, height // 25, width // 25, generator=generator)
        image = F.interpolate(coarse[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        image = (image + 0.08 * torch.randn(3, height, width, generator=generator)).clamp(0, 1)
        pixels = (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        target = folder / "train" / f"class{index % 2}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"{index:05d}.jpg", quality=90)
    return folder


def loader_root(data_path: str) -> Path:
    """The class folders --mode data reads: DIR/train for an ImageNet-style DIR, else DIR itself."""
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-path {data_path}: folder not found")
    return root / "train" if (root / "train").is_dir() else root


def benchmark_loader(args: BenchmarkConfig) -> dict:
    from datasets import ImageFolderDataset, RandomCropDecoder, SeededSampler, load_image, make_loader, train_transform

    with tempfile.TemporaryDirectory(prefix="jpegs-") as scratch:
        root = loader_root(args.data_path) if args.data_path else make_jpegs(Path(scratch), args.jpegs) / "train"
        if args.draft:  # as training does: the crop chosen first, then decoded at a reduced scale if it allows
            dataset = ImageFolderDataset(root, train_transform(args.resolution, crop=False),
                                         decode=RandomCropDecoder(args.resolution))
        else:
            dataset = ImageFolderDataset(root, train_transform(args.resolution), decode=load_image)
        loader = make_loader(dataset, args.batch_size, SeededSampler(len(dataset), 0), args.workers)
        for _ in loader:  # warm-up epoch: worker start-up and file cache
            break
        start = time.perf_counter()
        images = sum(labels.numel() for _, labels, _ in loader)
        elapsed = time.perf_counter() - start
    per_worker = images / elapsed / max(args.workers, 1)
    return dict(row=f"loader workers={args.workers} draft={args.draft}", resolution=args.resolution,
                images_per_s=images / elapsed, images_per_s_per_worker=per_worker, images=images)


# ---------------------------------------------------------------------------- results


def add_ratios(results: list[dict], peaks: dict[str, float]) -> None:
    """Each row's speed against the first row's (overall, and per round: lowest, median and
    highest) and its GFLOP/s as a share of the matmul peak of its precision."""
    for result in results:
        result["ratio"] = result["images_per_s"] / results[0]["images_per_s"]
        per_round = round_ratios(results[0]["round_medians"], result["round_medians"]) or (None, None, None)
        result["ratio_lowest_round"], result["ratio_median_round"], result["ratio_highest_round"] = per_round
        result["percent_of_peak"] = 100 * result["gflops"] / peaks[result["precision"]]


def git_commit() -> str | None:
    """The checkout's commit (with '+changes' when it has uncommitted changes), or None outside git."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # only read the repository: a plain status refreshes the index under .git/index.lock, which
        # a git killed half-way (a full disk: SIGXFSZ) would leave behind, blocking every git command
        changed = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=folder, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")


def processor_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, where `platform.processor()` only gives
    the architecture), else what `platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: BenchmarkConfig, arguments: list[str], device: torch.device, retained: bool) -> dict:
    """What a figure needs beside it to be reproduced: when, where, with what, and how measured.
    The commit (two git calls) is looked up only when a results file will hold it."""
    return dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=shlex.join(["python", "run_benchmark.py", *arguments]),
        commit=git_commit() if args.results_file else None,
        processor=processor_name(), threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        host_memory_retained=bool(retained), mode=args.mode, batch_size=args.batch_size,
        warmup_steps=args.warmup_steps, timed_steps=args.timed_steps, rounds=args.rounds,
    )


def write_results(args: BenchmarkConfig, machine: dict, results: list[dict]) -> int:
    """--results-file: JSON holds the environment and the rows; CSV a line per row, the
    environment's fields repeated on each, so that rows from several runs stay attributable once combined.
    Returns the exit code: 1 if the file could not be written (the printed table still holds the rows)."""
    if not args.results_file:
        return 0
    path = Path(args.results_file)
    try:
        if path.suffix == ".json":
            write_json(dict(environment=machine, rows=results), path)
        else:
            flat = {key: value for key, value in machine.items() if not isinstance(value, dict)}
            flat.update({f"matmul_peak_gflops_{name}": value
                         for name, value in machine.get("matmul_peak_gflops", {}).items()})
            lines = [{**{k: v for k, v in result.items() if k not in ("profile", "round_medians")},
                      **({"round_medians_s": " ".join(f"{t:.6g}" for t in result["round_medians"])}
                         if "round_medians" in result else {}), **flat}
                     for result in results]
            write_csv(lines, path)
    except WriteError as error:
        print(f"error: {error}; the figures printed above are complete", file=sys.stderr)
        return 1
    print(f"# wrote {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- main


# Options only one kind of mode reads: given with the other, they would be ignored without a word
DATA_MODE_OPTIONS = ("data_path", "jpegs", "resolution", "workers", "draft")
MODEL_MODE_OPTIONS = ("compare", "num_classes", "rounds", "round_time_limit", "warmup_steps", "timed_steps",
                      "profile_rows")


def check_mode_options(args: BenchmarkConfig, arguments: list[str]) -> None:
    """Refuse options the chosen mode does not read (a row's resolution, say, is CONFIG@RES, not
    --resolution, which sets the data mode's crop)."""
    given = options_given(arguments, [f.name for f in fields(BenchmarkConfig)])
    if args.mode == "data":
        unread = [name for name in MODEL_MODE_OPTIONS if name in given]
        if unread:
            raise ConfigError(f"{', '.join(map(option, unread))}: not read by --mode data, which times the host "
                              f"loader alone")
        if args.data_path and "jpegs" in given:
            raise ConfigError("--jpegs: not read with --data-path (it is how many JPEGs to generate without one)")
        return
    unread = [name for name in DATA_MODE_OPTIONS if name in given]
    if unread:
        hint = "; a row's resolution is CONFIG@RES, e.g. efficientnet-b0-g16-lnpn@224" if "resolution" in unread else ""
        raise ConfigError(f"{', '.join(map(option, unread))}: read only by --mode data (the host loader), "
                          f"not by --mode {args.mode}{hint}")


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_dataclass(arguments, BenchmarkConfig, BenchmarkConfig(), __doc__)
        if args.mode not in ("train", "inference", "data"):
            raise ConfigError(f"--mode must be train, inference or data, got {args.mode!r}")
        if args.batch_size < 1 or args.timed_steps < 1 or args.warmup_steps < 0 or args.rounds < 1:
            raise ConfigError("--batch-size, --timed-steps and --rounds must be at least 1, --warmup-steps at least 0")
        if not args.round_time_limit >= 0:  # nan too
            raise ConfigError(f"--round-time-limit must be a number of seconds, 0 or more, got {args.round_time_limit}")
        if args.num_classes < 1:
            raise ConfigError(f"--num-classes must be at least 1, got {args.num_classes}")
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be at least 1 (leave it out for PyTorch's default), got {args.threads}")
        if args.profile_calls < 0 or args.profile_rows < 1:
            raise ConfigError("--profile-calls must not be negative, --profile-rows must be at least 1")
        if args.profile_calls and args.mode == "data":
            raise ConfigError("--profile-calls profiles model steps: use it with --mode train or inference")
        check_mode_options(args, arguments)
        if args.mode == "data" and (args.workers < 0 or args.jpegs < 1 or args.resolution < 1):
            raise ConfigError("--workers must be at least 0, --jpegs and --resolution at least 1")
        if args.mode == "data" and args.data_path:
            loader_root(args.data_path)
        if args.mode == "data":
            check_shared_memory(args.workers, 1, batch_bytes(args.batch_size, args.resolution),
                                "--workers or --batch-size")
        if args.results_file:
            args.results_file = str(Path(args.results_file).expanduser())  # '~/x.json', as run_train takes paths
            results_file = Path(args.results_file)
            if results_file.suffix not in TABLE_SUFFIXES:
                raise ConfigError(f"--results-file must end in .json or .csv, got {args.results_file!r}")
            check_writable(results_file, "--results-file")  # before the measurements a failed write would lose
        rows = [parse_row(spec) for spec in args.compare] if args.mode != "data" else []
        for row in rows:
            check_row(row, args.batch_size if args.mode == "train" else None)
        check_compiled_rows(rows, args.rounds)
        device = pick_device(args.device, 0)
        tune_for_device(device)
    except (ConfigError, DataError, ParallelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    retained = args.retain_host_memory and retain_freed_memory()
    machine = environment(args, arguments, device, retained)
    print(f"# {machine['date'][:10]} | {machine['processor']} | "
          f"{machine['threads']} threads | torch {machine['torch']} | device {device}"
          + (f" ({machine['device_name']})" if device.type == "cuda" else "")
          + f" | host memory {'retained' if retained else 'returned to the OS'}")
    if args.mode == "data":
        try:
            result = benchmark_loader(args)
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"{result['row']}: {result['images_per_s']:.1f} images/s, "
              f"{result['images_per_s_per_worker']:.1f} per worker, at {result['resolution']} px")
        return write_results(args, machine, [result])

    peaks = {"fp32": matmul_peak_gflops(device, torch.float32), "bf16": matmul_peak_gflops(device, torch.bfloat16)}
    peaks["fp16"] = matmul_peak_gflops(device, torch.float16) if device.type == "cuda" else peaks["bf16"]
    machine["matmul_peak_gflops"] = peaks
    print("# matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"# mode {args.mode}, batch {args.batch_size}, {args.warmup_steps} warm-up + {args.timed_steps} timed steps"
          + (f", {args.rounds} interleaved rounds" if args.rounds > 1 else ""))
    # the first thing a process runs is slow (allocator, kernel caches): run the first row once untimed,
    # eagerly (a compile here would be thrown away: minutes for B2 on a GPU)
    first = prepare_row(eager_copy(rows[0]), args, device)  # a copy: prepare_row fills in the row
    median_step_seconds(first.step, device, 1, 1)
    del first
    try:
        results = benchmark_rows(rows, args, device)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    add_ratios(results, peaks)
    rounds_done = len(results[0]["round_medians"])
    spread = " per round |" if rounds_done > 1 else ""
    header = (f"| {'row':<44} | res | precision | layout | img/s | ratio |{spread} GMACs/img | GFLOP/s | % peak "
              f"| MB/img | ops/step |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for result in results:
        layout = ("NHWC" if result["channels_last"] else "NCHW") + (" compiled" if result["compile"] else "")
        if result["compile"] and result["compile_mode"] != "default":
            layout += f" ({result['compile_mode']})"
        spread_cell = (f" {result['ratio_median_round']:.2f} ({result['ratio_lowest_round']:.2f}–"
                       f"{result['ratio_highest_round']:.2f}) |" if spread else "")
        memory = "n/a" if result["peak_mb_per_image"] is None else f"{result['peak_mb_per_image']:.1f}"
        print(f"| {result['row']:<44} | {result['resolution']} | {result['precision']} | {layout} | "
              f"{result['images_per_s']:.1f} | {result['ratio']:.2f}x |{spread_cell} "
              f"{result['gmacs']:.3f} | {result['gflops']:.1f} | {result['percent_of_peak']:.1f} | {memory} | "
              f"{'n/a' if result['operators_per_step'] is None else result['operators_per_step']} |")
    if args.rounds > 1 and rounds_done < args.rounds:
        print(f"# {rounds_done} of {args.rounds} rounds done: --round-time-limit {args.round_time_limit:g} s reached")
    for result in results:
        if "profile" in result:
            print(f"\n## profile of {result['row']}: {result['profile']}")
    return write_results(args, machine, results)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: nothing is half-written (outputs are written atomically, at the end)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
