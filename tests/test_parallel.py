"""Replicas, gradient accumulation and pipeline stages on gloo (CPU), each against a
single-process run as the reference; and a worker killed under torchrun --max-restarts."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import run_train
from conftest import ROOT, file_size_limiter, run_cli, run_main, tiny_train_args
from dynamo_graphs import all_static, record_dynamo_graphs
from parallel.context import Context
from training.checkpoint import list_checkpoints, load_checkpoint

# no randomness beyond the data order: no dropout, drop-path or mixing; plain SGD
EXACT = ["--dropout", "0", "--stochastic-depth", "0", "--mixup-alpha", "0", "--cutmix-lambda", "1.0",
         "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--fine-tune-epochs", "0",
         "--epoch-average-decay", "0", "--epochs", "1", "--max-steps-per-epoch", "3", "--validate-every", "0"]


def torchrun(nproc: int, args: list[str], extra: list[str] | None = None, timeout: float = 600,
             file_size_limit: int | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         *(extra or []), str(ROOT / "run_train.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
        preexec_fn=file_size_limiter(file_size_limit),
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run)[-1])["model"]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def epoch_record(run: Path) -> dict:
    return next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch")


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def test_two_replicas_equal_one_process_with_double_batch(runs: Path) -> None:
    single = tiny_train_args(runs, *EXACT, "--micro-batch-size", "8", "--run-name", "single")
    assert run_train.main(single) == 0
    result = torchrun(2, tiny_train_args(runs, *EXACT, "--micro-batch-size", "4", "--replicas", "2",
                                         "--run-name", "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(runs / "single"), final_weights(runs / "ddp"), atol=1e-5)
    # validation over the replicas' shards scores each of the 355 images once, as one process does
    single_final, ddp_final = (json.loads((runs / n / "final.json").read_text()) for n in ("single", "ddp"))
    assert ddp_final["images"] == single_final["images"] == 355
    assert ddp_final["top1"] == pytest.approx(single_final["top1"], abs=1e-9)
    assert ddp_final["loss"] == pytest.approx(single_final["loss"], abs=1e-4)
    # only rank 0 wrote: one set of metrics lines
    epochs = [line for line in (runs / "ddp" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert len(epochs) == 1


@pytest.mark.parametrize("norm, extra, independent", [
    ("group", [], True), ("layer", [], True), ("layer", ["--proxy-norm"], True), ("batch", [], False),
])
def test_gradient_accumulation_equals_big_batch(runs: Path, norm: str, extra: list[str], independent: bool) -> None:
    common = [*EXACT, "--norm", norm, "--proxy-norm", "false", *extra]
    assert run_train.main(tiny_train_args(runs, *common, "--micro-batch-size", "8", "--run-name", "big")) == 0
    assert run_train.main(tiny_train_args(runs, *common, "--micro-batch-size", "2", "--gradient-accumulation", "4",
                                          "--run-name", "acc")) == 0
    big, acc = final_weights(runs / "big"), final_weights(runs / "acc")
    if independent:
        assert_same_weights(big, acc, atol=1e-5)
    else:
        # BatchNorm normalises each micro-batch of 2 by its own statistics: not the same model update
        assert max_difference(big, acc) > 1e-3


def test_two_stage_pipeline_equals_unsplit_model(runs: Path) -> None:
    common = [*EXACT, "--micro-batch-size", "4", "--gradient-accumulation", "2"]
    assert run_train.main(tiny_train_args(runs, *common, "--run-name", "whole")) == 0
    result = torchrun(2, tiny_train_args(runs, *common, "--pipeline-splits", "blocks.3", "--run-name", "pipe",
                                         "--log-every", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(runs / "whole"), final_weights(runs / "pipe"), atol=1e-5)
    # the losses are the last stage's: it prints the lines of a log without bars
    steps = [line.split(":")[0] for line in result.stderr.splitlines() if " step " in line]
    assert steps == [f"train epoch 1/1 step {k}/3" for k in (1, 2, 3)], result.stderr[-3000:]
    assert epoch_record(runs / "pipe")["train_loss"] == pytest.approx(epoch_record(runs / "whole")["train_loss"],
                                                                      abs=1e-5)
    (runs / "pipe" / "final.json").unlink()  # else a finished run is left as it is
    # the number of replicas sets the global batch: it may not change on resume
    more = torchrun(2, tiny_train_args(runs, *common, "--run-name", "pipe", "--resume", "auto", "--replicas", "2"))
    assert more.returncode != 0 and "was trained with --replicas 1" in more.stderr, more.stderr[-3000:]
    # the pipelined checkpoint loads into a single-process run, which finishes the run again
    assert run_train.main(tiny_train_args(runs, *common, "--run-name", "pipe", "--resume", "auto",
                                          "--stop-after-steps", "100")) == 0
    assert json.loads((runs / "pipe" / "final.json").read_text())["step"] == 3


def test_a_pipeline_from_initial_weights_trains_as_one_process_does(runs: Path) -> None:
    """--initial-weights is loaded before the model is split into stages: a 2-stage pipeline
    started from a run's weights ends where one process started from them ends."""
    common = [*EXACT, "--micro-batch-size", "4", "--gradient-accumulation", "2"]
    assert run_train.main(tiny_train_args(runs, *common, "--run-name", "start")) == 0
    start = ["--initial-weights", str(runs / "start" / "model.safetensors")]
    assert run_train.main(tiny_train_args(runs, *common, *start, "--run-name", "whole")) == 0
    result = torchrun(2, tiny_train_args(runs, *common, *start, "--pipeline-splits", "blocks.3", "--run-name", "pipe"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(runs / "whole"), final_weights(runs / "pipe"), atol=1e-5)
    assert max_difference(final_weights(runs / "whole"), final_weights(runs / "start")) > 1e-3  # both trained on


def test_two_stages_times_two_replicas(runs: Path) -> None:
    common = [*EXACT, "--micro-batch-size", "2", "--gradient-accumulation", "2"]
    assert run_train.main(tiny_train_args(runs, *common, "--micro-batch-size", "4", "--run-name", "whole")) == 0
    result = torchrun(4, tiny_train_args(runs, *common, "--pipeline-splits", "blocks.4.0", "--replicas", "2",
                                         "--pipeline-schedule", "1f1b", "--run-name", "mesh"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(runs / "whole"), final_weights(runs / "mesh"), atol=1e-5)


def test_channels_last_pipeline_and_replicas_match_one_process(runs: Path) -> None:
    """channels_last (the demo's layout): replicas must train without DDP's gradient-stride
    warning, and equal one process. Then the demo's bf16 + channels_last through a pipeline, whose
    stage boundaries must cross in a layout point-to-point accepts, against one process."""
    cl = [*EXACT, "--channels-last", "true"]
    assert run_train.main(tiny_train_args(runs, *cl, "--micro-batch-size", "8", "--run-name", "whole")) == 0
    ddp = torchrun(2, tiny_train_args(runs, *cl, "--micro-batch-size", "4", "--replicas", "2", "--run-name", "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Grad strides do not match" not in ddp.stderr
    assert_same_weights(final_weights(runs / "whole"), final_weights(runs / "ddp"), atol=1e-5)
    # in bf16 too: autocast covers the stages' forward passes, not their backward, as in one process
    # (the reference runs under torchrun too, for the same thread count: fp32 sums in other orders,
    # rounded to bf16, can differ by a bf16 step, and a few steps of training grow that)
    bf16 = [*cl, "--precision", "bf16"]
    whole = torchrun(1, tiny_train_args(runs, *bf16, "--run-name", "bf16-whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    pipe = torchrun(2, tiny_train_args(runs, *bf16, "--pipeline-splits", "blocks.3", "--run-name", "bf16-pipe"))
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    assert_same_weights(final_weights(runs / "bf16-whole"), final_weights(runs / "bf16-pipe"), atol=1e-5)


def test_half_res_training_with_replicas_equals_one_process(runs: Path) -> None:
    """The fine-tune at the test resolution freezes all but the head: the replicas' DDP wrapper of
    the training phase, which waits for every parameter's gradient, must not be the one used."""
    common = [*EXACT, "--half-res-training", "--fine-tune-epochs", "1"]
    assert run_train.main(tiny_train_args(runs, *common, "--micro-batch-size", "8", "--run-name", "single")) == 0
    result = torchrun(2, tiny_train_args(runs, *common, "--micro-batch-size", "4", "--replicas", "2",
                                         "--run-name", "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    phases = [json.loads(line).get("phase") for line in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert "fine_tune" in phases
    # fp32 sums over 8 images against 2 × 4 round differently: up to 2e-5 here after the 24 px phase
    assert_same_weights(final_weights(runs / "single"), final_weights(runs / "ddp"), atol=5e-5)


def test_pipeline_resumed_twice_matches_the_uninterrupted_run(runs: Path) -> None:
    """Each rank's RNG (dropout and drop-path are on here) and each stage's optimizer state come
    back from a checkpoint as they were: a run stopped at step 2, resumed, stopped at step 4 and
    resumed again writes at step 4 what an uninterrupted run writes. (Two stops: a stage resumed
    from a checkpoint holds the other stages' optimizer state as it was then, which must not reach
    the next checkpoint; and with one rank's RNG saved, stage 1 continued on stage 0's stream.)"""
    common = ["--epochs", "1", "--max-steps-per-epoch", "6", "--micro-batch-size", "4", "--gradient-accumulation", "2",
              "--fine-tune-epochs", "0", "--pipeline-splits", "blocks.3", "--checkpoint-every-steps", "2",
              "--keep-checkpoints", "10", "--validate-every", "0"]
    result = torchrun(2, tiny_train_args(runs, *common, "--run-name", "whole", "--stop-after-steps", "4"))
    assert result.returncode != 0 and "stop" in result.stderr, result.stderr[-3000:]
    for stop in ("2", "4"):
        result = torchrun(2, tiny_train_args(runs, *common, "--run-name", "cut", "--resume", "auto",
                                             "--stop-after-steps", stop))
        assert "stop" in result.stderr, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    whole, cut = (load_checkpoint(runs / name / "checkpoint-000000004.pt") for name in ("whole", "cut"))
    assert_same_weights(whole["model"], cut["model"], atol=0)
    assert whole["optimizer"]["state"].keys() == cut["optimizer"]["state"].keys()
    for index, state in whole["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, cut["optimizer"]["state"][index][name]), (index, name)
    assert len(cut["rng"]) == 2 and all(torch.equal(a["torch"], b["torch"]) for a, b in zip(whole["rng"], cut["rng"]))


# the model the two-rank scripts train, and the single-process reference builds (`tiny_lnpn_model`)
TINY_LNPN = dict(width=0.25, depth=0.25, num_classes=3, norm="layer", proxy_norm=True, dropout=0.0, stochastic_depth=0.0)

# a script run on two ranks by `run_on_two_ranks` (argv: output folder, repository, rank, extra): the
# model of `tiny_lnpn_model` and a plain cross-entropy step, on gloo
TWO_RANK_SETUP = f"""
import sys, torch, torch.nn.functional as F
from contextlib import nullcontext
sys.path.insert(0, sys.argv[2])
import parallel
from models import create_model
from parallel.data_parallel import Runner, StepSettings
from parallel.pipeline import PipelineRunner
torch.distributed.init_process_group("gloo")
torch.manual_seed(0)
model = create_model("efficientnet-b0", **{TINY_LNPN!r})
settings = StepSettings(F.cross_entropy, torch.amp.GradScaler("cpu", enabled=False), nullcontext, 2)
"""


def run_on_two_ranks(tmp_path: Path, script: str, *extra: str) -> list[dict]:
    """Run `script` under torchrun on two ranks; each saves a dict to rank{RANK}.pt, returned here."""
    path = tmp_path / "two_ranks.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
         "sh", "-c", f'exec "{sys.executable}" "{path}" "{tmp_path}" "{ROOT}" "$RANK" {" ".join(extra)}'],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def tiny_lnpn_model() -> torch.nn.Module:
    """The model TWO_RANK_SETUP builds, with the same initial weights: the single-process reference."""
    from models import create_model

    torch.manual_seed(0)
    return create_model("efficientnet-b0", **TINY_LNPN)


BLANK_STEP = TWO_RANK_SETUP + """
ctx = parallel.Context(rank=int(sys.argv[3]), world_size=2, replicas=2, distributed=True)
sys.path.insert(0, sys.argv[2] + "/tests")
import pytest
from dynamo_graphs import record_dynamo_graphs
traced = record_dynamo_graphs(pytest.MonkeyPatch())  # compiled: the graphs' input shapes
runner = Runner(model, ctx, compile_model=sys.argv[4] == "compiled")
images, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
if ctx.rank == 0:  # a window of two micro-batches
    runner.micro_step(images[:2], labels[:2], False, settings)
    runner.micro_step(images[2:], labels[2:], True, settings)
else:  # the same window, where no image of the last micro-batch could be decoded
    runner.micro_step(images[:2], labels[:2], False, settings)
    runner.micro_step(None, None, True, settings, blank=torch.zeros(1, 3, 32, 32))
torch.save(dict(training=[m.training for m in model.modules()], traced=traced,
                grads={n: p.grad for n, p in model.named_parameters()}), sys.argv[1] + f"/rank{ctx.rank}.pt")
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_a_replica_whose_last_micro_batch_has_no_image_still_joins_the_all_reduce(tmp_path: Path, mode: str) -> None:
    """Every image of one replica's last micro-batch undecodable: it used to skip the backward, and
    with it DDP's all-reduce, which the other replicas then waited in for ever. It now backpropagates
    zeros through a blank image: both replicas hold the mean of what they accumulated. Compiled,
    the blank image goes through DDP eagerly: no graph is compiled for its batch of one (on a GPU,
    minutes), which Dynamo's graphs are recorded to show."""
    ranks = run_on_two_ranks(tmp_path, BLANK_STEP, mode)
    model = tiny_lnpn_model()  # the reference: one process, each replica's accumulated gradient computed apart
    images, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    first = torch.autograd.grad(F.cross_entropy(model(images[:2]), labels[:2]) / 2, list(model.parameters()))
    second = torch.autograd.grad(F.cross_entropy(model(images[2:]), labels[2:]) / 2, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), first, second):
        expected = ((a + b) + a) / 2  # replica 0 accumulated both micro-batches, replica 1 the first
        for rank in ranks:
            # float32 sums in another order (one thread against two): about 1e-5 of the largest element
            torch.testing.assert_close(rank["grads"][name], expected, atol=1e-4 * float(expected.abs().max()),
                                       rtol=1e-4, msg=name)
    assert all(ranks[1]["training"])  # the blank step ran in eval mode and put the modes back
    # the batch sizes of the images Dynamo traced graphs for
    batches = [[shape[0] for graph in rank["traced"] for shape in graph if shape[1:] == (3, 32, 32)] for rank in ranks]
    assert batches == [[] if mode == "eager" else [2]] * 2, batches


SHORT_WINDOW = TWO_RANK_SETUP + """
ctx = parallel.Context(rank=int(sys.argv[3]), world_size=2, stages=2, distributed=True)
runner = PipelineRunner(model, ctx, ["blocks.3.0"], "1f1b")
images, labels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2])
windows = []
for window in ([slice(0, 2), slice(2, 4)], [slice(4, 6)]):  # the second cut short: one micro-batch, two stages
    for i, part in enumerate(window):
        runner.micro_step(images[part], labels[part], i == len(window) - 1, settings)
    windows.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
torch.save(windows, sys.argv[1] + f"/rank{ctx.rank}.pt")
torch.distributed.destroy_process_group()
"""


def test_a_1f1b_window_cut_short_runs_as_gpipe(tmp_path: Path) -> None:
    """1F1B needs a micro-batch per stage. A window cut below that (its other micro-batches had no
    decodable image) used to stop the run with the schedule's ValueError; it now runs as GPipe, and
    both windows' stage gradients are the single-process ones."""
    stages = run_on_two_ranks(tmp_path, SHORT_WINDOW)
    model = tiny_lnpn_model()
    images, labels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2])
    for index, window in enumerate(([slice(0, 2), slice(2, 4)], [slice(4, 6)])):
        loss = sum(F.cross_entropy(model(images[part]), labels[part]) for part in window) / len(window)
        expected = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
        got = {**stages[0][index], **stages[1][index]}
        assert stages[0][index].keys().isdisjoint(stages[1][index]) and got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-4 * float(value.abs().max()), rtol=1e-4,
                                       msg=f"window {index}: {name}")


def test_layout_errors_are_refused_before_work(runs: Path, capsys) -> None:
    cases = [
        (["--pipeline-splits", "blocks.3.0.expand"], "not a block boundary"),
        (["--pipeline-splits", "blocks.9"], "not a block boundary"),
        (["--pipeline-splits", "blocks.4", "blocks.2"], "in model order"),
        (["--replicas", "2"], "world size 1 does not match --replicas 2"),
        (["--pipeline-splits", "blocks.3.0", "--pipeline-schedule", "1f1b", "--gradient-accumulation", "1"],
         "--pipeline-schedule 1f1b needs at least one micro-batch per stage"),
    ]
    for args, needle in cases:
        code, stderr = run_main(run_train.main, tiny_train_args(runs, *args), capsys)
        assert code == 2 and needle in stderr, (args, stderr)
    result = run_cli("run_train.py", *tiny_train_args(runs, *cases[0][0]))  # the first, as a process
    assert result.returncode == 2 and cases[0][1] in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_full_disk_stops_every_replica_with_rank_0s_reason(runs: Path) -> None:
    """Only rank 0 writes: the others learn of its failed write from it, and stop with it, instead
    of failing on a lost connection. (No loader processes: the file size limit would also refuse
    their shared-memory files.)"""
    args = tiny_train_args(runs, *EXACT, "--micro-batch-size", "4", "--replicas", "2", "--run-name", "full")
    result = torchrun(2, args, file_size_limit=64 * 1024)
    assert result.returncode == 1, result.stderr
    log = result.stdout + result.stderr
    assert log.count(f"error: could not write {runs / 'full' / 'checkpoint-000000003-train-epoch0001.pt'}") == 1
    assert "Connection closed by peer" not in log and "[rank1]: Traceback" not in log, log
    assert "exitcode: 1" in log and "exitcode: -" not in log  # both ranks exited 1, none was killed


def test_a_disk_too_full_for_the_run_files_stops_every_replica_with_rank_0s_reason(runs: Path) -> None:
    """The lock file fits, config.yaml does not: rank 0 fails before training, and the other rank,
    told so, stops with it instead of training into a collective rank 0 never joins."""
    args = tiny_train_args(runs, *EXACT, "--micro-batch-size", "4", "--replicas", "2", "--run-name", "nofit")
    result = torchrun(2, args, file_size_limit=64)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log
    assert log.count(f"error: could not write {runs / 'nofit' / 'config.yaml'}") == 1, log
    assert "Connection closed by peer" not in log and "[rank1]: Traceback" not in log, log
    assert_rank_0_failed_and_rank_1_followed(log, 1)


def assert_rank_0_failed_and_rank_1_followed(log: str, code: int) -> None:
    """torchrun's summary: rank 0 (the root cause, listed last) exited `code`; rank 1 exited so too,
    or was still shutting down when torchrun, seeing rank 0's failure, sent it SIGTERM."""
    codes = re.findall(r"exitcode\s+: (-?\d+)", log)
    assert len(codes) == 2 and codes[-1] == str(code) and codes[0] in (str(code), "-15"), log


def test_a_run_folder_refused_by_rank_0_stops_every_rank_with_its_reason(runs: Path) -> None:
    """Rank 0 alone picks and locks the run folder. When it refuses one (a run is already there; the
    folder is locked by a live process), the other ranks stop with it, quietly, instead of failing
    on a lost connection with a traceback (or waiting in a collective rank 0 never joins)."""
    args = tiny_train_args(runs, *EXACT, "--micro-batch-size", "4", "--replicas", "2", "--run-name", "taken")
    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "notes.txt").write_text("someone else's")
    locked = runs / "locked"
    locked.mkdir()
    (locked / ".lock").write_text(str(os.getpid()))  # this test's process: alive
    for extra, reason in [([], f"error: run folder {runs / 'taken'} already holds a run"),
                          (["--run-name", "locked", "--resume", "auto"],
                           f"error: run folder {locked} is in use by another training process (pid {os.getpid()})")]:
        result = torchrun(2, [*args, *extra], timeout=120)
        log = result.stdout + result.stderr
        assert result.returncode == 1, log  # torchrun's code for a failed rank
        assert log.count(reason) == 1, log
        assert "Connection closed by peer" not in log and "[rank1]: Traceback" not in log, log
        assert_rank_0_failed_and_rank_1_followed(log, 2)
    assert (runs / "taken" / "notes.txt").read_text() == "someone else's"
    assert sorted(path.name for path in locked.iterdir()) == [".lock"]


def test_closing_frees_a_ddp_model_held_by_a_reference_cycle(tmp_path: Path) -> None:
    """Context.close() frees what still holds the process group before destroying it: a DDP model
    kept alive by a reference cycle (as an exception's traceback keeps a failed step's frames) was
    otherwise freed at interpreter shutdown, where gloo's threads aborted the process."""
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection in between: only close() may free the cycle
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        alive = weakref.ref(model)
        cycle: dict = {"model": model}
        cycle["self"] = cycle
        del model, cycle
        assert alive() is not None  # held by the cycle alone
        Context(distributed=True).close()
        assert alive() is None and not dist.is_initialized()
    finally:
        if was_enabled:
            gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker_pids(marker: str, local_rank: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "run_train.py" in cmdline and marker in cmdline and f"LOCAL_RANK={local_rank}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def test_killed_worker_resumes_under_max_restarts(runs: Path) -> None:
    args = tiny_train_args(runs, *EXACT, "--micro-batch-size", "4", "--replicas", "2", "--run-name", "elastic",
                           "--resume", "auto", "--checkpoint-every-steps", "1", "--max-steps-per-epoch", "12",
                           "--epochs", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
         str(ROOT / "run_train.py"), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    run = runs / "elastic"
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and process.poll() is None:
        if not killed and run.is_dir() and len(list_checkpoints(run)) >= 2:
            for pid in _worker_pids(str(run.parent), "1"):
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.2)
    output = process.communicate(timeout=300)[0]
    assert killed, output[-3000:]
    assert process.returncode == 0, output[-3000:]
    assert "resuming from" in output
    assert (run / "final.json").is_file()
    progress = load_checkpoint(list_checkpoints(run)[-1])["progress"]
    assert progress["epoch"] == 2 and progress["step"] == 24


def test_sigterm_to_a_torchrun_job_checkpoints_and_resumes_exactly(runs: Path) -> None:
    """SIGTERM to the whole job (Slurm's stop, `timeout`; Ctrl-C likewise), torchrun, ranks and
    loader workers alike: the ranks stop together at a step with one checkpoint and one message,
    and a resume ends where the uninterrupted run ends."""
    common = [*EXACT, "--micro-batch-size", "4", "--replicas", "2", "--workers", "1", "--epochs", "2",
              "--max-steps-per-epoch", "40", "--checkpoint-every-steps", "0"]
    reference = torchrun(2, tiny_train_args(runs, *common, "--run-name", "whole"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = tiny_train_args(runs, *common, "--run-name", "stopped")
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "run_train.py"), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    run = runs / "stopped"
    output = []
    for line in process.stdout:  # mid-way through the second epoch
        output.append(line)
        if line.startswith("train epoch 1/2"):
            time.sleep(0.5)
            os.killpg(process.pid, signal.SIGTERM)
            break
    output.append(process.communicate(timeout=300)[0])
    log = "".join(output)
    stop = list_checkpoints(run)[-1]
    assert log.count(f"stopped; checkpoint {stop}.") == 1, log[-3000:]
    assert log.count("stop requested") == 1, log[-3000:]  # said by rank 0 for all
    assert re.findall(r"exitcode\s+: (-?\d+)", log) == [], log[-3000:]  # no rank failed: they exited 143
    assert "[rank1]: Traceback" not in log and "worker died" not in log, log[-3000:]
    progress = load_checkpoint(stop)["progress"]
    assert progress["epoch"] == 1 and 0 < progress["micro_batch"] < 40, progress
    resumed = torchrun(2, [*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(run), final_weights(runs / "whole"), atol=0)


def test_compiled_training_follows_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile true` (on a GPU, Proxy Norm's memory saver): the step through torch.compile
    (Inductor, with Proxy Norm's plain formula) trains to the eager run's weights, and
    `--compile-mode` reaches torch.compile (reduce-overhead's CUDA graphs do not apply on a CPU,
    so this run compiles as the default mode does)."""
    compiled = []
    compile_model = torch.compile

    def recording_compile(module, *args, **kwargs):
        compiled.append(kwargs.get("mode"))
        return compile_model(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    runs = tmp_path / "runs"
    for name, flags in (("eager", ()), ("compiled", ("--compile", "true", "--compile-mode", "reduce-overhead"))):
        assert run_train.main(tiny_train_args(runs, *EXACT, *flags, "--run-name", name)) == 0
        assert compiled == ([] if name == "eager" else ["reduce-overhead"])
    assert_same_weights(final_weights(runs / "eager"), final_weights(runs / "compiled"), atol=1e-5)


def test_each_phase_compiles_its_own_static_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's recipe with `--compile true`: training at 24 px, then the fine-tune at 32. Each
    phase's graph is traced for its own resolution with static sizes. Without a fresh compile per
    phase, Dynamo took the fine-tune's new size as dynamic and traced a shape-generic graph, not
    the one a run at that resolution alone compiles. Dynamo's graphs are recorded by a backend
    that runs them as traced, so no Inductor compile is spent here."""
    traced = record_dynamo_graphs(monkeypatch)
    args = tiny_train_args(tmp_path / "runs", *EXACT, "--compile", "true", "--half-res-training",
                           "--fine-tune-epochs", "1")
    assert run_train.main(args) == 0
    assert len(traced) == 2, traced
    for shapes, resolution in zip(traced, (24, 32)):
        assert all_static(shapes) and (8, 3, resolution, resolution) in shapes, shapes
