"""run_validate.py: the sweep agrees with single evaluations, speed is measured properly,
outputs are written, bad input is refused clearly."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.transforms.v2.functional import to_pil_image

import run_train
import run_validate
from conftest import ROOT, run_cli, run_main, tiny_train_args
from datasets import (
    DEMO_ROOT,
    ImageFolderDataset,
    SeededSampler,
    check_classes,
    eval_transform,
    load_image,
    make_loader,
)
from training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from training.config import ConfigError, named_config
from training.evaluate import evaluate
from training.measure import inference_throughput
from training.trained import eval_preprocessing, load_trained_model, load_weights


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    args = tiny_train_args(root / "runs", "--run-name", "r", "--fine-tune-epochs", "0", "--epoch-average-decay", "0",
                           "--ema-decay", "0.5")
    assert run_train.main(args) == 0
    return root / "runs" / "r"


def _rows(prefix: Path) -> list[dict]:
    return json.loads(Path(f"{prefix}.json").read_text())


def _top1_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The reference scores, computed here from a model's logits, for comparison with a sweep's row."""
    top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    return top1, float(torch.nn.functional.cross_entropy(logits, labels))


def test_sweep_matches_single_resolution_evaluations(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = str(list_checkpoints(trained_run)[-1])
    common = ["--checkpoint", checkpoint, "--progress", "false", "--timed-batches", "2", "--warmup-batches", "1"]
    assert run_validate.main([*common, "--resolutions", "24,32,40,48,56", "--output-prefix", str(tmp_path / "sweep"),
                              "--plot", str(tmp_path / "sweep.png")]) == 0
    sweep = {row["resolution"]: row for row in _rows(tmp_path / "sweep")}
    assert sorted(sweep) == [24, 32, 40, 48, 56]
    for resolution in (24, 40):
        assert run_validate.main([*common, "--resolutions", str(resolution), "--output-prefix",
                                  str(tmp_path / f"single{resolution}")]) == 0
        single = _rows(tmp_path / f"single{resolution}")[0]
        for key in ("top1", "top5", "loss", "images"):
            assert single[key] == sweep[resolution][key], key
    # outputs: marks, CSV, plot
    assert sum(row["best"] for row in sweep.values()) == 1
    assert max(sweep.values(), key=lambda r: r["top1"])["best"]
    with open(tmp_path / "sweep.csv") as handle:
        header = next(csv.reader(handle))
    for column in ("resolution", "top1", "top5", "loss", "images_per_s", "gmacs", "peak_memory_mb_per_image",
                   "best", "pareto"):
        assert column in header
    assert (tmp_path / "sweep.png").stat().st_size > 20_000
    assert sweep[56]["gmacs"] > sweep[24]["gmacs"] * 4  # MACs grow with the pixel count


def test_run_folder_and_weights_choice(trained_run: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "all"
    assert run_validate.main(["--checkpoint", str(trained_run), "--progress", "false", "--timed-batches", "1",
                              "--weights", "ema", "--output-prefix", str(prefix)]) == 0
    rows = _rows(prefix)
    assert [Path(r["checkpoint"]).name for r in rows] == [p.name for p in list_checkpoints(trained_run)]
    assert {r["weights"] for r in rows} == {"ema"}
    # the training run ended on its EMA weights: its own final validation (its own loader) agrees
    final = json.loads((trained_run / "final.json").read_text())
    assert rows[-1]["top1"] == pytest.approx(final["top1"]) and rows[-1]["loss"] == pytest.approx(final["loss"])
    assert run_validate.main(["--checkpoint", str(trained_run / "model.safetensors"), "--progress", "false",
                              "--timed-batches", "1", "--output-prefix", str(tmp_path / "st")]) == 0
    assert _rows(tmp_path / "st")[0]["top1"] == pytest.approx(json.loads((trained_run / "final.json").read_text())["top1"])
    # a folder holding only the exported weights (as shared without checkpoints) is swept from them
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "model.safetensors").write_bytes((trained_run / "model.safetensors").read_bytes())
    assert run_validate.main(["--checkpoint", str(shared), "--progress", "false", "--timed-batches", "1",
                              "--output-prefix", str(tmp_path / "shared-sweep")]) == 0
    assert _rows(tmp_path / "shared-sweep")[0]["top1"] == _rows(tmp_path / "st")[0]["top1"]


def test_run_folder_sources_are_checked_before_the_sweep(trained_run: Path, tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    """A checkpoint without the weights asked for (as a fine-tune phase's, which keeps no averages)
    is left out of a run folder's sweep with a note; a corrupt one stops the run before anything is
    validated, instead of after the checkpoints before it."""
    import torch

    folder = tmp_path / "run"
    folder.mkdir()
    checkpoints = list_checkpoints(trained_run)
    for path in checkpoints:
        (folder / path.name).write_bytes(path.read_bytes())
    first = folder / checkpoints[0].name
    state = load_checkpoint(first)
    torch.save(dict(state, ema=None), first)
    args = ["--checkpoint", str(folder), "--progress", "false", "--timed-batches", "1", "--weights", "ema",
            "--resolutions", "32", "--output-prefix", str(tmp_path / "sweep")]
    assert run_validate.main(args) == 0
    assert [Path(row["checkpoint"]).name for row in _rows(tmp_path / "sweep")] == [p.name for p in checkpoints[1:]]
    assert f"note: left out {first.name}: it holds no ema weights (it has: raw)" in capsys.readouterr().err

    evaluated = []
    monkeypatch.setattr(run_validate, "evaluate", lambda *a, **k: evaluated.append(1) or {})
    torch.save(state, first)  # all weights back: with the old order of checks, this one was validated first
    last = folder / checkpoints[-1].name
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert run_validate.main(args) == 2
    assert f"checkpoint {last} is truncated or corrupt" in capsys.readouterr().err
    assert evaluated == []


def test_fine_tune_protocol_runs_per_resolution(trained_run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = str(list_checkpoints(trained_run)[-1])
    args = ["--checkpoint", checkpoint, "--progress", "false", "--timed-batches", "1", "--resolutions", "40"]
    assert run_validate.main([*args, "--output-prefix", str(tmp_path / "plain")]) == 0
    assert run_validate.main([*args, "--fine-tune-epochs", "1", "--output-prefix", str(tmp_path / "ft")]) == 0
    plain, tuned = _rows(tmp_path / "plain")[0], _rows(tmp_path / "ft")[0]
    assert tuned["fine_tune_epochs"] == 1
    assert tuned["loss"] != plain["loss"]  # the head was trained at 40 px before testing
    assert "fp16" not in capsys.readouterr().err
    # fine-tuning in fp16 on a CPU is noted once for a run folder's sweep, not once per checkpoint
    assert run_validate.main(["--checkpoint", str(trained_run), "--progress", "false", "--timed-batches", "1",
                              "--resolutions", "24,32", "--fine-tune-epochs", "1", "--precision", "fp16",
                              "--output-prefix", str(tmp_path / "fp16")]) == 0
    assert len(_rows(tmp_path / "fp16")) == 2 * len(list_checkpoints(trained_run)) >= 4
    assert capsys.readouterr().err.count("fp16 convolution backward is 100-2000x slower") == 1


def test_ctrl_c_during_per_resolution_fine_tuning_exits_130(trained_run: Path, tmp_path: Path) -> None:
    """The fine-tuning pass is not resumable, so it writes no checkpoints and Ctrl-C stops it at once
    (it used to checkpoint into a temporary folder and end in a StopRequested traceback)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run_validate.py"), "--checkpoint", str(trained_run / "model.safetensors"),
         "--fine-tune-epochs", "1000", "--resolutions", "32", "--progress", "false",
         "--output-prefix", str(tmp_path / "sweep")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    output = []
    for line in process.stdout:  # interrupted mid-pass, after its first epoch
        output.append(line)
        if line.startswith("fine_tune epoch 1/1000"):
            process.send_signal(signal.SIGINT)
            break
    output.append(process.communicate(timeout=120)[0])
    text = "".join(output)
    assert process.returncode == 130 and "interrupted" in text and "Traceback" not in text, text
    assert not (tmp_path / "sweep.csv").exists()


def test_a_stopped_sweep_writes_the_points_it_measured(trained_run: Path, tmp_path: Path) -> None:
    """SIGTERM (a job's time limit) after the first point: each point was printed as it was measured,
    and those are written, as complete rows, before exit 143 (the sweep used to die silent, losing them)."""
    process = subprocess.Popen(
        [sys.executable, "-u", str(ROOT / "run_validate.py"), "--checkpoint", str(trained_run), "--progress", "false",
         "--resolutions", ",".join(str(r) for r in range(24, 129, 8)), "--output-prefix", str(tmp_path / "sweep")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if " px: top-1 " in line:
            process.send_signal(signal.SIGTERM)
            break
    output.append(process.communicate(timeout=120)[0])
    text = "".join(output)
    assert process.returncode == 143 and "Traceback" not in text, text
    measured = [line.split(":")[0] for line in text.splitlines() if " px: top-1 " in line]
    assert f"interrupted after {len(measured)} point(s) of the sweep" in text
    rows = _rows(tmp_path / "sweep")
    assert [f"{Path(row['checkpoint']).name} @ {row['resolution']} px" for row in rows] == measured
    assert all(row["images"] > 0 and row["images_per_s"] > 0 for row in rows)
    assert len(rows) < len(list_checkpoints(trained_run)) * 14  # stopped before the end


def test_pareto_marks() -> None:
    rows = [dict(checkpoint="c", resolution=r, top1=a, images_per_s=s, gmacs=g)
            for r, a, s, g in [(16, 50, 400, 1), (24, 70, 300, 2), (32, 65, 250, 3), (40, 80, 100, 4)]]
    run_validate.mark_best_and_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, True]
    assert [r["best"] for r in rows] == [False, False, False, True]


def test_the_table_shows_long_checkpoint_names_whole() -> None:
    names = ["runs/x/checkpoint-000000018-fine_tune-epoch0001.pt", "runs/x/model.safetensors"]
    rows = [dict(checkpoint=name, resolution=64, top1=50.0, top5=90.0, loss=1.0, images_per_s=10.0, gmacs=0.1,
                 peak_memory_mb_per_image=1.0, best=True, pareto=False) for name in names]
    lines = run_validate.format_table(rows).splitlines()
    assert lines[2].split()[0] == "checkpoint-000000018-fine_tune-epoch0001.pt"
    assert lines[3].split()[0] == "model.safetensors"
    assert len({line.index(" 64 ") for line in lines[2:]}) == 1  # the columns line up


class _Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return x.mean()


def test_throughput_is_eval_mode_no_grad_and_excludes_warmup() -> None:
    model = _Recorder().train()
    result = inference_throughput(model, 4, 16, torch.device("cpu"), warmup=3, timed=5)
    assert len(model.calls) == 8 and result["timed_batches"] == 5
    assert all(call == (False, False) for call in model.calls)
    assert model.training  # restored afterwards
    assert result["images_per_s"] == pytest.approx(4 / result["median_batch_s"])


def test_eval_preprocessing_takes_the_models_resolution_where_the_config_leaves_it_unset() -> None:
    """The named ImageNet configs leave --resolution unset (the model's own): the preprocessing of
    their runs' weights crops at the model's resolution (B2: 260 px), with the config's crop and resize."""
    cfg = dataclasses.replace(named_config("efficientnet-b2-g16-gn"), crop_pct=1.0, interpolation="bicubic")
    assert cfg.resolution is None
    image = to_pil_image(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8))
    prepared = eval_preprocessing(cfg)(image)
    assert prepared.shape == (3, 260, 260)
    assert torch.equal(prepared, eval_transform(260, 1.0, "bicubic")(image))


def test_trained_model_loads_in_python_and_scores_as_the_run_did(trained_run: Path, tmp_path: Path) -> None:
    """`load_trained_model`, for users of the weights outside the CLIs: the exported model
    scores on the validation set what the run reported for it, and a checkpoint gives each of its
    weight sets."""
    model, cfg = load_trained_model(trained_run / "model.safetensors")
    assert not model.training and cfg.model == "efficientnet-b0"
    val = ImageFolderDataset(DEMO_ROOT / "validation", eval_preprocessing(cfg), check_classes(DEMO_ROOT))
    loader = make_loader(val, 64, SeededSampler(len(val), 0, shuffle=False), 0)
    reported = json.loads((trained_run / "final.json").read_text())
    assert evaluate(model, loader, torch.device("cpu"))["top1"] == pytest.approx(reported["top1"], abs=1e-6)

    checkpoint = list_checkpoints(trained_run)[-1]
    state = load_checkpoint(checkpoint)
    ema, _ = load_trained_model(checkpoint, "ema")
    for name, tensor in ema.state_dict().items():
        assert torch.equal(tensor, state["ema"][f"module.{name}"]), name
    with pytest.raises(ConfigError, match="--weights must be one of"):
        load_trained_model(checkpoint, "best")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(trained_run / "model.safetensors"), bare)
    with pytest.raises(CheckpointError, match="carries no config"):
        load_trained_model(bare)

    # a run folder, as the CLIs take one: its exported weights, or for EMA its newest checkpoint
    # (it said "checkpoint not found" of a folder that exists)
    for weights, expected in [("raw", load_file(trained_run / "model.safetensors")),
                              ("ema", {name.removeprefix("module."): tensor for name, tensor in state["ema"].items()})]:
        from_folder, _ = load_trained_model(trained_run, weights)
        for name, tensor in from_folder.state_dict().items():
            assert torch.equal(tensor, expected[name]), (weights, name)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / checkpoint.name).write_bytes(checkpoint.read_bytes())
    raw, _ = load_trained_model(unfinished)  # no model.safetensors yet: the newest checkpoint's raw weights
    for name, tensor in raw.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoints \(checkpoint-\*\.pt\) or model.safetensors in run folder"):
        load_trained_model(empty)


def test_a_folder_of_runs_where_a_run_folder_is_wanted_names_them(trained_run: Path, tmp_path: Path, capsys) -> None:
    """The --output-dir given where its run folder was meant (each CLI, and the Python API) gets the
    names of the runs it holds, not only "no checkpoints" of a folder that plainly holds them."""
    runs = trained_run.parent
    hint = f"; it holds run folders ({trained_run.name}): give one of them"
    code, err = run_main(run_validate.main, ["--checkpoint", str(runs), "--progress", "false"], capsys)
    assert code == 2 and err.strip().endswith(hint), err
    for argv in (["--resume", str(runs)], ["--initial-weights", str(runs)]):
        code, err = run_main(run_train.main, tiny_train_args(tmp_path / "new", *argv), capsys)
        assert code == 2 and err.strip().endswith(hint), err
    with pytest.raises(CheckpointError, match=f"in run folder {runs}; it holds run folders \\({trained_run.name}\\)"):
        load_trained_model(runs)
    (tmp_path / "empty").mkdir()  # nothing inside: no hint
    code, err = run_main(run_validate.main, ["--checkpoint", str(tmp_path / "empty"), "--progress", "false"], capsys)
    assert code == 2 and err.strip().endswith(f"in run folder {tmp_path / 'empty'}"), err


def test_paths_under_home_are_expanded(trained_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """'~/runs/x' (quoted, or from a script, where no shell expands it) as run_train takes it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "runs").symlink_to(trained_run.parent)
    run = f"~/runs/{trained_run.name}"
    code, err = run_main(run_validate.main, ["--checkpoint", run, "--resolutions", "32", "--timed-batches", "1",
                                             "--progress", "false", "--output-prefix", "~/sweep", "--plot", "~/sweep.png"],
                         capsys)
    assert code == 0, err
    assert (tmp_path / "sweep.csv").is_file() and (tmp_path / "sweep.png").is_file()
    assert load_trained_model(run)[1].model == "efficientnet-b0"


def test_bad_input_is_refused_clearly(trained_run: Path, tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 10)
    truncated = tmp_path / "truncated.pt"
    good = list_checkpoints(trained_run)[-1]
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["--checkpoint", str(corrupt)], "truncated or corrupt"),
        (["--checkpoint", str(truncated)], "truncated or corrupt"),
        (["--checkpoint", str(good), "--resolutions", ""], "--resolutions is empty"),
        (["--checkpoint", str(good), "--resolution-range", "64:32:8"], "is empty"),
        (["--checkpoint", str(good), "--resolutions", "8,32"], "below the model's minimum"),
        (["--checkpoint", str(good), "--weights", "averaged"], "has no such weights"),
        (["--checkpoint", str(good), "--data-path", str(tmp_path)], "--data-path is read only with --data imagenet"),
        (["--checkpoint", str(good), "--data", "generated", "--crop-pct", "0.5", "--interpolation", "bicubic"],
         "--crop-pct, --interpolation: generated data is made at each test resolution, with no resize or crop"),
        ([], "--checkpoint PATH is required"),
        (["--checkpoint", str(tmp_path)], "no checkpoints (checkpoint-*.pt) or model.safetensors in run folder"),
        (["--checkpoint", str(good), "--output-prefix", str(corrupt / "sweep")], f"cannot write {corrupt}"),
        (["--checkpoint", str(good), "--plot", str(corrupt / "sweep.png")], f"cannot write {corrupt}"),
        (["--checkpoint", str(good), "--output-prefix", " "], "--output-prefix ' ' ends in a blank name"),
    ]
    for args, needle in cases:
        code, stderr = run_main(run_validate.main, args, capsys)
        assert code == 2 and needle in stderr, (args, stderr)
    result = run_cli("run_validate.py", *cases[1][0])  # a corrupt checkpoint, as a process
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr


def test_a_validation_folder_alone_is_labelled_by_the_class_names_saved_with_the_model(
        trained_run: Path, tmp_path: Path, capsys) -> None:
    """ImageNet's validation set is often all a machine holds: validation reads only val/ (or
    validation/). Its class folders are labelled by the class names saved with the model, so a
    folder holding two of the ten classes scores each image against its own class's output.
    (Before, a train/ folder was required, and labels came from a folder's place among those present.)"""
    classes = check_classes(DEMO_ROOT)
    weights = trained_run / "model.safetensors"
    assert load_weights(weights)[2] == classes  # saved with the exported weights
    assert load_weights(list_checkpoints(trained_run)[-1])[2] == classes  # and with every checkpoint
    subset = tmp_path / "subset"
    for name in ("3", "7"):
        shutil.copytree(DEMO_ROOT / "validation" / name, subset / "val" / name)

    # the reference: each image through the model by hand, against its own class's output
    model, cfg = load_trained_model(weights)
    transform = eval_preprocessing(cfg)
    images, labels = [], []
    for name in ("3", "7"):
        for path in sorted((subset / "val" / name).iterdir()):
            images.append(transform(load_image(str(path))))
            labels.append(classes.index(name))
    with torch.no_grad():
        logits = model(torch.stack(images))
    labels = torch.tensor(labels)
    expected_top1, expected_loss = _top1_and_loss(logits, labels)

    prefix = tmp_path / "sweep"
    common = ["--checkpoint", str(weights), "--data", "imagenet", "--progress", "false", "--timed-batches", "1",
              "--output-prefix", str(prefix)]
    assert run_validate.main([*common, "--data-path", str(subset)]) == 0
    row = _rows(prefix)[0]
    assert row["images"] == len(labels)
    assert row["top1"] == pytest.approx(expected_top1) and row["loss"] == pytest.approx(expected_loss, rel=1e-4)

    # folders the model does not know are refused by name; the fine-tune protocol needs train/ too
    (subset / "val" / "cat").mkdir()
    code, stderr = run_main(run_validate.main, [*common, "--data-path", str(subset)], capsys)
    assert code == 2 and "class folder(s) under" in stderr and ": cat (its classes include 0, 1" in stderr, stderr
    (subset / "val" / "cat").rmdir()
    code, stderr = run_main(run_validate.main, [*common, "--data-path", str(subset), "--fine-tune-epochs", "1"], capsys)
    assert code == 2 and f"{subset} has no train/ folder for the train split" in stderr, stderr


def test_a_validation_folder_alone_needs_every_class_when_no_names_were_saved(trained_run: Path,
                                                                               tmp_path: Path, capsys) -> None:
    """A checkpoint written before the class names were saved: a validation folder alone is
    labelled by its own folders' order only when it holds as many classes as the model has outputs."""
    state = load_checkpoint(list_checkpoints(trained_run)[-1])
    del state["classes"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert load_weights(old)[2] is None
    shutil.copytree(DEMO_ROOT / "validation", tmp_path / "all" / "validation")
    common = ["--checkpoint", str(old), "--data", "imagenet", "--progress", "false", "--timed-batches", "1"]
    assert run_validate.main([*common, "--data-path", str(tmp_path / "all"),
                              "--output-prefix", str(tmp_path / "all-sweep")]) == 0
    assert run_validate.main([*common, "--data", "demo", "--output-prefix", str(tmp_path / "demo-sweep")]) == 0
    for key in ("top1", "loss", "images"):  # the same images under the same labels as with train/ beside them
        assert _rows(tmp_path / "all-sweep")[0][key] == _rows(tmp_path / "demo-sweep")[0][key], key
    shutil.rmtree(tmp_path / "all" / "validation" / "9")
    code, stderr = run_main(run_validate.main, [*common, "--data-path", str(tmp_path / "all")], capsys)
    assert code == 2 and "has 9 class folders and the model 10 outputs" in stderr, stderr


@pytest.mark.parametrize("outputs", [5, 12])
def test_data_with_other_classes_than_the_model_has_outputs_is_refused(outputs: int, tmp_path: Path, capsys) -> None:
    """Weights without class names (a plain state dict here; a generated-data run's are the same)
    validated on the 10 demo classes: with 5 outputs it used to end in an IndexError; with 12 (or
    generated data's 1000) it was scored, output i as the i-th folder, on classes it never saw."""
    from models import create_model
    from training.config import model_overrides

    cfg = named_config("demo")
    weights = tmp_path / "weights.pt"
    torch.save(create_model(cfg.model, **model_overrides(cfg, outputs)).state_dict(), weights)
    code, stderr = run_main(run_validate.main, ["--checkpoint", str(weights), "--config", "demo", "--data", "demo",
                                                "--progress", "false", "--output-prefix", str(tmp_path / "sweep")],
                            capsys)
    assert code == 2 and (f"demo_data/train has 10 class folders and the model {outputs} outputs, and the model's "
                          f"file holds no class names to match them by: give the data it was trained on") in stderr
    assert not (tmp_path / "sweep.csv").exists()


def test_out_of_memory_keeps_the_points_measured_before_it(trained_run: Path, tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    """A sweep that runs out of memory at a high resolution writes the points it measured, says what
    to lower in one line, and exits 1."""
    real = run_validate.inference_throughput

    def fail_above_40(model, batch_size, resolution, *args, **kwargs):
        if resolution > 40:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
        return real(model, batch_size, resolution, *args, **kwargs)

    monkeypatch.setattr(run_validate, "inference_throughput", fail_above_40)
    prefix = tmp_path / "sweep"
    argv = ["--checkpoint", str(trained_run), "--resolutions", "24,32,48,64", "--output-prefix", str(prefix),
            "--progress", "false", "--timed-batches", "1", "--warmup-batches", "0"]
    assert run_validate.main(argv) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error == ["error: out of memory after 2 point(s) of the sweep (could not allocate 64.0 GiB): lower "
                     "--batch-size or the largest resolution; the points measured are written below"]
    assert [row["resolution"] for row in _rows(prefix)] == [24, 32]
    monkeypatch.setattr(run_validate, "inference_throughput", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):  # any other failure is not dressed up as a user error
        run_validate.main(argv)


def test_a_full_disk_at_the_end_says_which_file_and_keeps_the_table(trained_run: Path, tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"  # over 20 kB (above), the tables under 2 kB
    result = run_cli("run_validate.py", "--checkpoint", str(trained_run / "model.safetensors"), "--resolutions", "24,32",
                     "--progress", "false", "--output-prefix", str(tmp_path / "sweep"), "--plot", str(plot),
                     file_size_limit=16 * 1024)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: could not write {plot}: File too large; the table above holds every point" in result.stderr
    assert [row["resolution"] for row in _rows(tmp_path / "sweep")] == [24, 32] and not plot.exists()
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("model.safetensors")] == ["24", "32"]


def test_output_prefix_that_names_a_folder_puts_the_files_inside_it(tmp_path: Path, trained_run: Path) -> None:
    """`--output-prefix out/` (or an existing folder) means "in that folder", not out.csv beside it."""
    source = trained_run / "model.safetensors"
    existing = tmp_path / "existing"
    existing.mkdir()
    for given, folder in [(str(existing), existing), (f"{tmp_path / 'new'}/", tmp_path / "new")]:
        prefix = run_validate.output_prefix(given, source)
        assert prefix.parent == folder and prefix.name.startswith("sweep-")
    assert run_validate.output_prefix(str(tmp_path / "mine"), source) == tmp_path / "mine"
    assert run_validate.output_prefix(None, source).parent == trained_run
    result = run_cli("run_validate.py", "--checkpoint", str(source), "--resolutions", "32", "--progress", "false",
                     "--output-prefix", f"{tmp_path / 'made'}/")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "made").glob("sweep-*.csv"))) == 1 and not (tmp_path / "made.csv").exists()


def test_torchvision_weights_sweep_with_the_config_of_their_model(tmp_path: Path, capsys) -> None:
    """torchvision's EfficientNet weights carry no config: --config names their model (G1-BN), and
    the sweep scores them as torchvision's own model does, on images prepared by torchvision's own
    preset for those weights (bicubic, as it scores them; or bilinear, as training here resizes)."""
    import torchvision
    from torchvision.transforms import InterpolationMode

    shutil.copytree(DEMO_ROOT / "validation", tmp_path / "data" / "val")
    files = [(label, path) for label, name in enumerate(sorted(p.name for p in (tmp_path / "data" / "val").iterdir()))
             for path in sorted((tmp_path / "data" / "val" / name).iterdir())]
    labels = torch.tensor([label for label, _ in files])

    def prepared(interpolation: InterpolationMode) -> torch.Tensor:
        """The images as torchvision's preset for these weights prepares them, at 32 px from the
        short side resized to 36 (the config's crop, 0.875, as 224 from 256)."""
        preset = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms(
            crop_size=32, resize_size=36, interpolation=interpolation)
        return torch.stack([preset(load_image(str(path))) for _, path in files])

    torch.manual_seed(0)
    reference = torchvision.models.efficientnet_b0(num_classes=10)
    with torch.no_grad():  # BatchNorm statistics measured on the images, so that the outputs depend on them
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # a plain average
                module.reset_running_stats()
        reference.train()(prepared(InterpolationMode.BICUBIC))
    weights = tmp_path / "efficientnet_b0.pth"
    torch.save(reference.state_dict(), weights)

    prefix = tmp_path / "sweep"
    common = ["--checkpoint", str(weights), "--data", "imagenet", "--data-path", str(tmp_path / "data"),
              "--resolutions", "32", "--precision", "fp32", "--progress", "false", "--timed-batches", "1",
              "--workers", "0", "--output-prefix", str(prefix)]
    losses = []
    for interpolation, mode in (("bicubic", InterpolationMode.BICUBIC), ("bilinear", InterpolationMode.BILINEAR)):
        with torch.no_grad():
            logits = reference.eval()(prepared(mode))
        assert logits.std(0).min() > 0.1  # outputs that differ from image to image
        expected_top1, expected_loss = _top1_and_loss(logits, labels)
        losses.append(expected_loss)

        assert run_validate.main([*common, "--config", "efficientnet-b0-g1-bn", "--interpolation", interpolation]) == 0
        row = _rows(prefix)[0]
        assert row["images"] == len(labels) and row["interpolation"] == interpolation
        assert row["config"] == "efficientnet-b0-g1-bn"
        assert row["top1"] == pytest.approx(expected_top1) and row["loss"] == pytest.approx(losses[-1], rel=1e-4)
    assert abs(losses[0] - losses[1]) > 1e-3  # the two resizes differ enough for the check to tell them apart

    # without --config: what to give; with another variant's config, --weights ema or a bad resize: refused
    for extra, needle in [([], "holds torchvision's weights, with no config of its own: give --config NAME"),
                          (["--config", "efficientnet-b0-g16-lnpn"], "only a G1-BN model"),
                          (["--config", "efficientnet-b2-g1-bn"], "of the same size takes them"),
                          (["--config", "efficientnet-b0-g1-bn", "--weights", "ema"], "holds one set of weights"),
                          (["--config", "efficientnet-b0-g1-bn", "--interpolation", "cubic"],
                           "--interpolation must be bilinear or bicubic, got 'cubic'")]:
        code, stderr = run_main(run_validate.main, [*common, *extra], capsys)
        assert code == 2 and needle in stderr, (extra, stderr)


def test_config_is_refused_for_files_that_carry_their_own(trained_run: Path, capsys) -> None:
    for source in (trained_run, trained_run / "model.safetensors"):
        code, stderr = run_main(run_validate.main, ["--checkpoint", str(source), "--config", "demo",
                                                    "--progress", "false"], capsys)
        assert code == 2 and "carries its config: leave --config out" in stderr, stderr
