"""run_benchmark.py: rows, interleaved rounds, and its errors (the figures themselves are in docs/)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_benchmark
from conftest import ROOT, run_cli
from dynamo_graphs import all_static, record_dynamo_graphs
from training.measure import device_busy_us, profile_summary

TINY_ROW = "demo@32+fp32+nocl+width=0.25+depth=0.25"


def test_rounds_interleave_every_row_and_pool_their_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    order = []
    measure = run_benchmark.median_step_seconds

    def recording(step, device, warmup, timed):
        order.append(step)
        return measure(step, device, warmup, timed)

    monkeypatch.setattr(run_benchmark, "median_step_seconds", recording)
    rows = [run_benchmark.parse_row(spec) for spec in (TINY_ROW, TINY_ROW + "+proxy_norm=false")]
    args = run_benchmark.BenchmarkConfig(batch_size=2, warmup_steps=0, timed_steps=2, rounds=3, num_classes=10)
    results = run_benchmark.benchmark_rows(rows, args, torch.device("cpu"))
    assert [r["timed_steps"] for r in results] == [6, 6]
    assert len(order) == 6 and order[0::2] == [order[0]] * 3 and order[1::2] == [order[1]] * 3
    assert order[0] is not order[1]  # A B A B A B: the rows alternate
    for result in results:
        assert result["images_per_s"] > 0 and result["gmacs"] > 0 and result["peak_mb_per_image"] > 0
        assert len(result["round_medians"]) == 3  # one median per round, for the per-round ratios


def test_round_time_limit_stops_starting_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    """Past --round-time-limit no new round starts, and the table covers the rounds done (a short
    lease still gets its table)."""
    code = run_benchmark.main(["--compare", TINY_ROW, TINY_ROW + "+proxy_norm=false", "--batch-size", "2",
                               "--warmup-steps", "0", "--timed-steps", "2", "--rounds", "50",
                               "--round-time-limit", "1e-9", "--num-classes", "10"])
    assert code == 0
    captured = capsys.readouterr()
    assert "# 1 of 50 rounds done: --round-time-limit 1e-09 s reached" in captured.out
    assert "round time limit reached: 1 of 50 rounds done" in captured.err
    # each row's speed is on stderr as it is measured, so a run cut short by a timeout keeps them
    assert f"round 1: {TINY_ROW}: " in captured.err and " img/s" in captured.err
    assert len([line for line in captured.out.splitlines() if line.startswith("| demo@32")]) == 2
    for bad in ("-1", "nan"):  # nan would compare false with every elapsed time: no limit at all
        assert run_benchmark.main(["--round-time-limit", bad]) == 2


def test_compare_prints_a_row_per_variant_with_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_benchmark.main(["--compare", TINY_ROW, TINY_ROW + "+proxy_norm=false", "--batch-size", "2",
                               "--warmup-steps", "0", "--timed-steps", "1", "--rounds", "2", "--num-classes", "10"])
    assert code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| demo@32")]
    assert len(lines) == 2 and "| 1.00x | 1.00 (1.00–1.00) |" in lines[0]  # the first row against itself, per round
    median, spread = lines[1].split("|")[7].strip().rstrip(")").split(" (")
    low, high = (float(x) for x in spread.split("–"))
    assert 0 < low <= float(median) <= high and "per round" in out
    assert "2 interleaved rounds" in out and "host memory" in out


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--threads", "-2"], "--threads must be at least 1"),
    (["--compare", "demo@abc"], "resolution after @ must be a positive whole number of pixels, got 'abc'"),
    (["--compare", "demo@-5"], "resolution after @ must be a positive whole number of pixels, got '-5'"),
    (["--compare", "demo@0"], "row 'demo@0': resolution after @ must be at least 16 pixels"),
    (["--compare", "timm:efficientnet_b0@8"], "resolution after @ must be at least 16 pixels"),
    (["--compare", "demo+float8"], "unknown flag 'float8'"),
    # a setting given twice was last-wins (and @RES beat +resolution=) without a word
    (["--compare", "demo+bf16+fp16"], "row 'demo+bf16+fp16': bf16 and fp16 both set precision: give it once"),
    (["--compare", "demo+cl+channels_last=false"], "cl and channels_last=false both set channels_last"),
    (["--compare", "demo@64+resolution=32"], "@64 and resolution=32 both set resolution"),
    (["--compare", "timm:efficientnet_b0+compile+nocompile"], "compile and nocompile both set compile"),
    (["--num-classes", "0"], "--num-classes must be at least 1, got 0"),  # was a traceback from the model
    # refused before the matmul peak is measured, not as a traceback when the row is built
    (["--compare", "demo", "no-such-config"], "unknown config 'no-such-config'"),
    (["--compare", "demo", "demo+norm=group+norm_groups=7"], "the model of this config cannot be built: norm_groups=7"),
    (["--compare", "timm:no_such_net"], "timm has no model 'no_such_net'"),
    (["--mode", "data", "--data-path", "/no/such/folder"], "--data-path /no/such/folder: folder not found"),
    (["--mode", "data", "--workers", "-1"], "--workers must be at least 0"),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no CUDA device, or not that many
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--device", "meta"], "--device 'meta' is not a device"),
    (["--profile-calls", "-1"], "--profile-calls must not be negative"),
    (["--profile-rows", "0"], "--profile-rows must be at least 1"),
    (["--mode", "data", "--profile-calls", "2"], "--profile-calls profiles model steps"),
    (["--compare", "demo+compile_mode=reduce-overhead"],
     "row 'demo+compile_mode=reduce-overhead': --compile-mode reduce-overhead needs --compile true"),
    (["--results-file", "figures.txt"], "--results-file must end in .json or .csv, got 'figures.txt'"),
    # options the mode does not read are refused, not silently ignored
    (["--resolution", "224"], "--resolution: read only by --mode data (the host loader), not by --mode train; "
                              "a row's resolution is CONFIG@RES"),
    (["--mode", "inference", "--workers", "2", "--draft", "false"], "--workers, --draft: read only by --mode data"),
    (["--resol", "224"], "--resolution: read only by --mode data"),  # argparse's abbreviation of the option
    (["--nodraft"], "--draft: read only by --mode data"),  # simple-parsing's false of a bool option
    (["--mode", "data", "--compare", "demo", "--rounds", "3"], "--compare, --rounds: not read by --mode data"),
    (["--mode", "data", "--data-path", ".", "--jpegs", "10"], "--jpegs: not read with --data-path"),
    # options a row's step is not built from are refused, not silently ignored
    (["--compare", "demo+micro_batch_size=4"], "row 'demo+micro_batch_size=4': micro_batch_size would change nothing"),
    (["--compare", "demo+half_res_training=true"], "half_res_training would change nothing this benchmark times"),
    (["--compare", "timm:efficientnet_b0+width=0.5"], "a timm row takes @RES and the precision, layout and compile "
                                                      "flags only, not width"),
    # the timed training step itself: BatchNorm with one image on 1x1 maps
    (["--compare", "demo@32+norm=batch+proxy_norm=false", "--batch-size", "1"],
     "the last feature maps are 1x1 and --batch-size is 1: raise --batch-size"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_benchmark.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and not captured.out  # refused before the header and any measuring


@pytest.mark.parametrize("layout", ["imagenet", "class folders"])
def test_data_mode_reads_every_image_of_the_folder(layout, tmp_path, capsys) -> None:
    """--mode data on an ImageNet-style folder (its train/) or on class folders directly: one pass
    over every image after a warm-up batch, the figures in the results file."""
    from PIL import Image

    root = tmp_path / "jpegs"
    classes = root / "train" if layout == "imagenet" else root
    for index in range(10):
        folder = classes / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (50 + index, 40), (index * 20, 80, 160)).save(folder / f"{index}.jpg")
    if layout == "imagenet":  # a validation split beside it is not read
        (root / "validation" / "class0").mkdir(parents=True)
    argv = ["--mode", "data", "--data-path", str(root), "--workers", "0", "--batch-size", "4", "--resolution", "32",
            "--results-file", str(tmp_path / "loader.json")]
    assert run_benchmark.main(argv) == 0
    row = json.loads((tmp_path / "loader.json").read_text())["rows"][0]
    assert row["images"] == 10 and row["resolution"] == 32 and row["images_per_s"] > 0
    assert f"{row['images_per_s']:.1f} images/s" in capsys.readouterr().out


def test_results_file_holds_the_printed_figures_and_how_they_were_measured(tmp_path, capsys, monkeypatch) -> None:
    """--results-file: JSON with the environment and every row, CSV a line per row; both carry
    the figures the table printed."""
    argv = ["--compare", TINY_ROW, TINY_ROW + "+proxy_norm=false", "--batch-size", "2", "--warmup-steps", "0",
            "--timed-steps", "1", "--rounds", "2", "--num-classes", "10"]
    assert run_benchmark.main([*argv, "--results-file", str(tmp_path / "out" / "figures.json")]) == 0
    table = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| demo@32")]
    document = json.loads((tmp_path / "out" / "figures.json").read_text())
    rows, machine = document["rows"], document["environment"]
    assert [row["row"] for row in rows] == [TINY_ROW, TINY_ROW + "+proxy_norm=false"]
    for row, printed in zip(rows, table):
        assert f"{row['images_per_s']:.1f}" == printed[5].strip() and f"{row['ratio']:.2f}x" == printed[6].strip()
        assert printed[7].strip() == (f"{row['ratio_median_round']:.2f} ({row['ratio_lowest_round']:.2f}–"
                                      f"{row['ratio_highest_round']:.2f})")
        assert len(row["round_medians"]) == 2 and row["timed_steps"] == 2
        assert row["percent_of_peak"] == pytest.approx(100 * row["gflops"] / machine["matmul_peak_gflops"]["fp32"])
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])
    assert machine["batch_size"] == 2 and machine["rounds"] == 2 and machine["torch"] == torch.__version__
    assert "--results-file" in machine["command"] and machine["device"] == "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.startswith("model name")]
    if models:  # Linux: the CPU's model, not only its architecture ("x86_64")
        assert machine["processor"] == models[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert head and machine["commit"].split("+")[0] == head

    monkeypatch.setenv("HOME", str(tmp_path))  # '~' expanded, as run_train expands its paths (it was a folder '~')
    assert run_benchmark.main([*argv, "--results-file", "~/figures.csv"]) == 0
    with open(tmp_path / "figures.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert [line["row"] for line in lines] == [TINY_ROW, TINY_ROW + "+proxy_norm=false"]
    assert all(line["batch_size"] == "2" and float(line["matmul_peak_gflops_fp32"]) > 0 for line in lines)
    assert float(lines[0]["ratio"]) == 1.0 and len(lines[1]["round_medians_s"].split()) == 2


def test_an_unwritable_results_file_is_refused_before_measuring(tmp_path, capsys) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    code = run_benchmark.main(["--compare", TINY_ROW, "--results-file", str(blocker / "figures.json")])
    captured = capsys.readouterr()
    assert code == 2 and f"cannot write {blocker / 'figures.json'}" in captured.err
    assert "(check --results-file)" in captured.err and "matmul peak" not in captured.out  # nothing measured
    assert blocker.read_text() == "a file where a folder should be"


def test_a_full_disk_at_the_start_is_refused_before_measuring(tmp_path) -> None:
    path = tmp_path / "figures.json"  # no byte can be written: refused like an unwritable folder
    result = run_cli("run_benchmark.py", "--compare", TINY_ROW, "--results-file", str(path), file_size_limit=0)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: cannot write {path}: File too large (check --results-file)" in result.stderr
    assert "matmul peak" not in result.stdout and list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_end_says_which_file_and_keeps_the_printed_figures(tmp_path) -> None:
    path = tmp_path / "figures.json"  # a few kB: over the limit below, which the writability check passes
    result = run_cli("run_benchmark.py", "--compare", TINY_ROW, "--batch-size", "2", "--warmup-steps", "0",
                     "--timed-steps", "1", "--num-classes", "10", "--results-file", str(path), file_size_limit=512)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: could not write {path}: File too large; the figures printed above are complete" in result.stderr
    assert f"| {TINY_ROW}" in result.stdout and not path.exists() and list(tmp_path.iterdir()) == []


def test_round_ratios_compare_each_rounds_medians_with_the_same_rounds() -> None:
    # first row 1.0 s a step in each round; the second 0.5, 0.8, then 0.4 s: 2.0x, 1.25x, 2.5x faster
    assert run_benchmark.round_ratios([1.0, 1.0, 1.0], [0.5, 0.8, 0.4]) == (1.25, 2.0, 2.5)
    # drift that slows both rows alike in round two leaves the per-round ratio unchanged
    assert run_benchmark.round_ratios([1.0, 3.0], [0.5, 1.5]) == (2.0, 2.0, 2.0)
    assert run_benchmark.round_ratios([1.0], [0.5]) is None  # one round: no spread to show


def test_compiled_rows_on_cpu_report_no_memory_or_operator_figure() -> None:
    """The CPU memory count runs a compiled model's eager code, so it would report the eager
    model's memory as the compiled one's: such rows report none."""
    args = run_benchmark.BenchmarkConfig(batch_size=2, num_classes=10)
    calls = []
    results = {}
    for compiled in (False, True):
        row = run_benchmark.parse_row(TINY_ROW + ("+compile" if compiled else ""))
        row.compile = compiled
        prepared = run_benchmark.Prepared(row, lambda: calls.append(torch.ones(1000)), gmacs=0.1, passes=1,
                                          times=[0.5])
        results[compiled] = run_benchmark.result_of(prepared, args, torch.device("cpu"))
    assert results[False]["peak_mb_per_image"] == pytest.approx(4000 / 1e6 / 2)  # 1,000 fp32 values kept alive
    assert results[False]["operators_per_step"] == 1  # torch.ones
    # the compiled row is not run to count either: its memory and operators would be the eager code's
    assert results[True]["peak_mb_per_image"] is None and results[True]["operators_per_step"] is None
    assert len(calls) == 2


@pytest.mark.parametrize("mode, measured", [("default", True), ("reduce-overhead", False), ("max-autotune", False)])
def test_rows_with_cuda_graphs_report_no_memory_figure(mode: str, measured: bool, monkeypatch) -> None:
    """On CUDA, a compiled row's memory is the allocator's peak during a step, except with CUDA graphs,
    whose tensors were allocated in their pool before the step: that peak would leave them out."""
    monkeypatch.setattr(run_benchmark, "peak_memory_bytes", lambda step, device: 4000)
    args = run_benchmark.BenchmarkConfig(batch_size=2, num_classes=10)
    row = run_benchmark.parse_row(f"{TINY_ROW}+compile+compile_mode={mode}")
    row.compile, row.compile_mode = True, mode  # what resolving the row's config sets
    prepared = run_benchmark.Prepared(row, lambda: None, gmacs=0.1, passes=1, times=[0.5])
    result = run_benchmark.result_of(prepared, args, torch.device("cuda"))
    assert result["peak_mb_per_image"] == (pytest.approx(4000 / 1e6 / 2) if measured else None)


def _default_sigint() -> None:
    """In the child before exec: a shell's background job starts with SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler. Ctrl-C at a terminal is what the test is about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_without_a_traceback() -> None:
    process = subprocess.Popen([sys.executable, "run_benchmark.py", "--compare", TINY_ROW, "--rounds", "100000",
                                "--batch-size", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=_default_sigint)
    for line in process.stdout:  # measuring has begun
        if line.startswith("# mode"):
            break
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == 130 and "interrupted" in rest and "Traceback" not in rest, rest


def test_operator_count_counts_computing_operators_not_views() -> None:
    a = torch.randn(4, 3)
    assert run_benchmark.operators_per_call(lambda: (a * 2).t().sum()) == 2  # mul, sum; t is a view
    assert run_benchmark.operators_per_call(lambda: (a.view(12), a.t(), a[0])) == 0
    assert run_benchmark.operators_per_call(lambda: torch.relu(a + 1).mean()) == 3


def test_profile_lists_each_rows_heaviest_operators_after_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_benchmark.main(["--compare", TINY_ROW, TINY_ROW + "+proxy_norm=false", "--batch-size", "2",
                               "--warmup-steps", "0", "--timed-steps", "1", "--num-classes", "10",
                               "--profile-calls", "1", "--profile-rows", "4"])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert f"measured {TINY_ROW}: " in captured.err  # one round: each row's speed as it is measured
    table_end = out.index("## profile of")
    sections = out[table_end:].split("## profile of ")[1:]
    assert [section.split(":")[0] for section in sections] == [TINY_ROW, TINY_ROW + "+proxy_norm=false"]
    for section in sections:
        assert "ms a call (profiled, 1 calls)" in section and "Self CPU time total" in section
        listed = [line for line in section.splitlines() if "aten::" in line or "Optimizer." in line]
        assert 1 <= len(listed) <= 4  # --profile-rows
        # a training step's heaviest work (either: one profiled call of a tiny model on a machine
        # running other tests too can find the convolutions below a few preempted small ops)
        assert any("convolution" in line or "Optimizer.step" in line for line in listed), section


def test_profile_summary_puts_the_costliest_operator_first() -> None:
    big, small = torch.randn(400, 400), torch.randn(4)
    summary = profile_summary(lambda: (big @ big, small + 1), torch.device("cpu"), calls=2, rows=10)
    first, rest = summary.splitlines()[0], summary.splitlines()[1:]
    assert first.startswith("wall ") and "2 calls" in first
    operators = [line.split()[0] for line in rest if line.strip().startswith("aten::")]
    assert operators[0] == "aten::mm" and "aten::add" in operators


def test_proxy_norm_ab_script_times_every_variant_and_restores_the_model(monkeypatch, capsys) -> None:
    """scripts/ab_proxy_norm.py swaps methods of the model's classes between rounds: each variant
    gets a line, and the classes are as they were afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import ab_proxy_norm

    originals = {target: getattr(*target) for target in [
        (ab_proxy_norm.EfficientNet, "proxy_table"), (ab_proxy_norm.SqueezeExcite, "forward_split"),
        (ab_proxy_norm.ConvNormAct, "forward_for_conv")]}
    monkeypatch.setattr(sys, "argv", ["ab_proxy_norm.py", "--what", "parts", "--resolution", "32", "--batch-size",
                                      "2", "--rounds", "1", "--steps", "1", "--precision", "fp32"])
    ab_proxy_norm.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"parts fp32 32px {label}" for label in (
        "LN", "LN+PN", "LN+PN, constant moment table", "LN+PN, SE without its Proxy Norm terms", "LN+PN, no folds")]
    assert all(getattr(*target) is method for target, method in originals.items())


def test_a_rows_compile_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None: modes.append(mode) or module)
    args = run_benchmark.BenchmarkConfig(batch_size=2, num_classes=10)
    for flags, expected in (("+compile", "default"), ("+compile+compile_mode=max-autotune", "max-autotune")):
        prepared = run_benchmark.prepare_row(run_benchmark.parse_row(TINY_ROW + flags), args, torch.device("cpu"))
        assert modes[-1] == expected and prepared.row.compile_mode == expected
    run_benchmark.prepare_row(run_benchmark.parse_row(TINY_ROW), args, torch.device("cpu"))
    assert len(modes) == 2  # not compiled: torch.compile is not called


def test_a_rows_label_smoothing_reaches_its_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    cross_entropy = run_benchmark.F.cross_entropy
    monkeypatch.setattr(run_benchmark.F, "cross_entropy",
                        lambda *a, label_smoothing: seen.append(label_smoothing) or cross_entropy(*a))
    args = run_benchmark.BenchmarkConfig(batch_size=2, num_classes=10)
    for flags, expected in (("", 0.1), ("+label_smoothing=0", 0.0), ("+label_smoothing=0.3", 0.3)):
        run_benchmark.prepare_row(run_benchmark.parse_row(TINY_ROW + flags), args, torch.device("cpu")).step()
        assert seen[-1] == expected, flags


@pytest.mark.parametrize("rounds", [1, 2])
def test_compiled_rows_are_traced_for_their_own_sizes(rounds: int, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Two compiled rows of one process, at 32 and 40 px, G16 then G1 (other weight shapes): each
    graph is traced with its own static sizes, as a run of that row alone would compile it. Before,
    the second row's changed sizes were taken as dynamic, and a shape-generic graph was timed."""
    traced = record_dynamo_graphs(monkeypatch)
    g1 = "demo@40+fp32+nocl+width=0.25+depth=0.25+group_size=1+norm=batch+proxy_norm=false"
    code = run_benchmark.main(["--compare", TINY_ROW + "+compile", g1 + "+compile", "--batch-size", "2",
                               "--warmup-steps", "0", "--timed-steps", "1", "--rounds", str(rounds),
                               "--num-classes", "10"])
    assert code == 0, capsys.readouterr().err
    assert len(traced) == 2, traced  # the untimed warm-up of the first row runs eagerly
    for shapes, resolution in zip(traced, (32, 40)):
        assert all_static(shapes) and (2, 3, resolution, resolution) in shapes, shapes


def test_more_compiled_rows_than_dynamo_keeps_are_refused_with_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    """Interleaved rounds keep all compiled rows at once: past Dynamo's limit a row would run
    eagerly under a compiled row's name, so such a comparison is refused before anything is built."""
    import torch._dynamo

    argv = ["--compare", TINY_ROW + "+compile", TINY_ROW + "+compile+proxy_norm=false", "--batch-size", "2",
            "--timed-steps", "1", "--num-classes", "10"]
    with torch._dynamo.config.patch(recompile_limit=1):
        assert run_benchmark.main([*argv, "--rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert "--compare has 2 compiled rows" in err and "torch._dynamo.config.recompile_limit" in err
    assert "Traceback" not in err


def test_gpu_busy_time_counts_each_kernel_once() -> None:
    """An operator's profiler event carries its kernels' device time too: only the device's own
    events count, and user annotations (record_function ranges) not at all."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(device_type, microseconds, annotation=False):
        return SimpleNamespace(device_type=device_type, self_device_time_total=microseconds,
                               is_user_annotation=annotation)

    events = [event(DeviceType.CPU, 30.0), event(DeviceType.CUDA, 20.0), event(DeviceType.CUDA, 10.0),
              event(DeviceType.CUDA, 99.0, annotation=True)]  # aten op (its 2 kernels), 2 kernels, a range
    assert device_busy_us(events) == 30.0
