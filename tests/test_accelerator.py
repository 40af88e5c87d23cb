"""CUDA paths, each against the CPU (or a single process) as the reference.

Skipped without a CUDA GPU, as on CI. On a GPU machine: `python -m pytest tests/test_accelerator.py`.
`TEST_ACCELERATOR=cpu` runs the same checks with the CPU standing in for the accelerator, which
checks the tests themselves where no GPU is at hand.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_models import TINY, assert_compiled_model_matches_eager
from test_parallel import EXACT, assert_same_weights, epoch_record, final_weights, torchrun

import run_benchmark
import run_train
from conftest import tiny_train_args
from models import VARIANTS, create_model
from parallel.context import Context
from parallel.data_parallel import Runner, StepSettings

ACCELERATOR = os.environ.get("TEST_ACCELERATOR", "cuda")
pytestmark = pytest.mark.skipif(ACCELERATOR == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (TEST_ACCELERATOR=cpu runs these checks on the CPU)")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """No TF32 in the fp32 references: cuDNN and cuBLAS would otherwise round inputs to 10 bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("training, channels_last", [(True, False), (True, True), (False, True)])
def test_model_on_the_accelerator_matches_the_cpu(variant: str, training: bool, channels_last: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Values and gradients in float64, so that any difference is a wrong code path (the border
    corrections and hand-written backwards run on the accelerator here; the CPU reference folds
    Proxy Norm into the convs, which an eager GPU does not)."""
    monkeypatch.setattr("models.efficientnet.FOLD_MIN_ELEMENTS", 0)  # every fold, at this small size too
    torch.manual_seed(0)
    model = create_model("efficientnet-b1", **VARIANTS[variant], **TINY).double().train(training)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    weights = torch.randn(4, 10, dtype=torch.float64)

    def run(device: str, memory_format: torch.memory_format):
        copy = create_model("efficientnet-b1", **VARIANTS[variant], **TINY).double().train(training)
        copy.load_state_dict(model.state_dict())
        copy = copy.to(device, memory_format=memory_format)
        out = copy(x.to(device).contiguous(memory_format=memory_format))
        grads = torch.autograd.grad((out * weights.to(device)).sum(), list(copy.parameters()))
        return out.cpu(), [g.cpu() for g in grads]

    out, grads = run("cpu", torch.contiguous_format)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    accelerator_out, accelerator_grads = run(ACCELERATOR, layout)
    torch.testing.assert_close(accelerator_out, out, rtol=1e-9, atol=1e-10)
    for (name, _), got, expected in zip(model.named_parameters(), accelerator_grads, grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_in_reduced_precision_follows_fp32(tmp_path: Path, precision: str) -> None:
    """A few steps of the demo config in fp32 and in bf16/fp16 autocast (fp16 with loss scaling),
    channels_last, on the accelerator: same data and start, so they differ by rounding only. The
    learning rate is small so that rounding is not amplified by the steps (at 0.05 the tiny model's
    loss moved by up to 13 % between fp32 and bf16 on the CPU, by chance, seed to seed): the losses
    are then the forward passes', and the weights' updates say whether backward followed."""
    runs = tmp_path / "runs"
    common = [*EXACT, "--device", ACCELERATOR, "--channels-last", "true", "--micro-batch-size", "8"]
    for name, extra in (("start", ["--precision", "fp32", "--lr", "1e-12"]),  # moves no fp32 weight
                        ("fp32", ["--precision", "fp32", "--lr", "1e-4"]),
                        (precision, ["--precision", precision, "--lr", "1e-4"])):
        assert run_train.main(tiny_train_args(runs, *common, *extra, "--run-name", name)) == 0
    reference, reduced = epoch_record(runs / "fp32"), epoch_record(runs / precision)
    # on the CPU, over 3 seeds: losses within 0.5 %, updates' cosine >= 0.995 and norms within 2 %;
    # a broken autocast path, or a step skipped by loss scaling, is off by far more
    assert reduced["train_loss"] == pytest.approx(reference["train_loss"], rel=0.03)
    start = final_weights(runs / "start")

    def update(run: str) -> torch.Tensor:
        weights = final_weights(runs / run)
        assert all(torch.isfinite(w.float()).all() for w in weights.values() if w.is_floating_point())
        return torch.cat([(w.float() - start[n].float()).flatten() for n, w in weights.items() if w.is_floating_point()])

    fp32_update, reduced_update = update("fp32"), update(precision)
    assert fp32_update.norm() > 0
    assert torch.nn.functional.cosine_similarity(reduced_update, fp32_update, dim=0) > 0.98
    assert 0.9 < float(reduced_update.norm() / fp32_update.norm()) < 1.1
    assert not torch.equal(reduced_update, fp32_update)  # autocast did run in the reduced precision


def test_deterministic_training_on_the_accelerator_repeats_bitwise(tmp_path: Path) -> None:
    """--deterministic on the accelerator: every kernel a deterministic one, and on CUDA cuBLAS with
    its workspace fixed, which the run sets (PyTorch raises at the first matmul otherwise). Two
    runs end with the same weights, bit for bit."""
    runs = tmp_path / "runs"
    common = [*EXACT, "--device", ACCELERATOR, "--deterministic", "--micro-batch-size", "8"]
    for name in ("first", "second"):
        assert run_train.main(tiny_train_args(runs, *common, "--run-name", name)) == 0
    first, second = final_weights(runs / "first"), final_weights(runs / "second")
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


def test_compiled_model_on_the_accelerator_matches_eager() -> None:
    """torch.compile on the accelerator (Triton on CUDA): the plain Proxy Norm formula it compiles
    gives the eager model's values and gradients."""
    assert_compiled_model_matches_eager(ACCELERATOR, batch_size=8)


def test_training_with_cuda_graphs_follows_eager(tmp_path: Path) -> None:
    """`--compile true --compile-mode reduce-overhead` (on CUDA, each step's kernels replayed as
    CUDA graphs) through the real training loop, whose metrics read the compiled step's outputs:
    the eager run's weights, and its training loss."""
    runs = tmp_path / "runs"
    common = [*EXACT, "--device", ACCELERATOR, "--precision", "fp32", "--micro-batch-size", "8"]
    assert run_train.main(tiny_train_args(runs, *common, "--run-name", "eager")) == 0
    assert run_train.main(tiny_train_args(runs, *common, "--compile", "true", "--compile-mode", "reduce-overhead",
                                          "--run-name", "graphs")) == 0
    assert_same_weights(final_weights(runs / "eager"), final_weights(runs / "graphs"), atol=1e-4)
    assert epoch_record(runs / "graphs")["train_loss"] == pytest.approx(epoch_record(runs / "eager")["train_loss"],
                                                                        rel=1e-4)


@pytest.mark.skipif(ACCELERATOR == "cuda" and torch.cuda.device_count() < 2,
                    reason="nccl needs one GPU per replica: two GPUs")
def test_two_replicas_on_the_accelerator_equal_one_process(tmp_path: Path) -> None:
    """Two replicas under torchrun (nccl on CUDA) against one process with the double batch."""
    runs = tmp_path / "runs"
    common = [*EXACT, "--device", ACCELERATOR]
    assert run_train.main(tiny_train_args(runs, *common, "--micro-batch-size", "8", "--run-name", "single")) == 0
    result = torchrun(2, tiny_train_args(runs, *common, "--micro-batch-size", "4", "--replicas", "2",
                                         "--run-name", "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(runs / "single"), final_weights(runs / "ddp"), atol=1e-5)


def test_collectives_and_replicas_on_the_accelerators_backend(tmp_path: Path) -> None:
    """The collectives of Context and a DDP step on the backend the accelerator uses, in a group of
    one process (one GPU is enough): nccl takes only tensors on the GPU, so a collective given a
    CPU tensor fails here where CI's gloo would not notice. One replica's all-reduce is the identity:
    the DDP step's gradients equal the plain model's."""
    device = torch.device("cuda:0" if ACCELERATOR == "cuda" else ACCELERATOR)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        assert dist.get_backend() == backend
        ctx = Context(replicas=2, device=device, distributed=True)  # replicas > 1: Runner wraps in DDP
        assert ctx.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
        assert ctx.any_rank(True) and not ctx.any_rank(False)
        assert ctx.broadcast_from_main([{"stop": "disk full"}, 3]) == [{"stop": "disk full"}, 3]
        ctx.barrier()
        result = ctx.reduce_eval(dict(images=4, top1=50.0, top5=100.0, loss=1.25, skipped=0))
        assert result == dict(top1=50.0, top5=100.0, loss=1.25, images=4, skipped=0)

        torch.manual_seed(0)
        model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY).to(device,
                                                                                  memory_format=torch.channels_last)
        reference = copy.deepcopy(model)
        runner = Runner(model, ctx)
        assert runner.ddp is not None
        x = torch.randn(4, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.tensor([0, 1, 2, 3], device=device)
        settings = StepSettings(loss_fn=torch.nn.functional.cross_entropy,
                                scaler=torch.amp.GradScaler(device.type, enabled=False), autocast=nullcontext,
                                accumulation=1)
        runner.micro_step(x, y, final=True, settings=settings)
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_benchmark_runs_on_the_accelerator(capsys: pytest.CaptureFixture[str]) -> None:
    """run_benchmark.py's rows in each precision and layout on the accelerator, with its memory
    figure (CUDA: the allocator's high-water mark)."""
    row = "demo@32+width=0.25+depth=0.25"
    code = run_benchmark.main(["--device", ACCELERATOR, "--compare", f"{row}+fp32+nocl", f"{row}+bf16+cl",
                               f"{row}+fp16+cl", "--batch-size", "4", "--warmup-steps", "1", "--timed-steps", "2",
                               "--num-classes", "10"])
    assert code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| demo@32")]
    assert len(lines) == 3
    for line in lines:
        cells = [cell.strip() for cell in line.split("|")]
        assert float(cells[5]) > 0 and float(cells[-3]) > 0 and int(cells[-2]) > 0  # img/s, MB/img, ops/step
    assert f"device {ACCELERATOR}" in out


def test_training_loaders_pin_memory_for_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, batches come in page-locked memory, so that their non_blocking copies overlap with
    the GPU's work; on the CPU nothing is pinned."""
    pinned = []
    make_loader = run_train.make_loader

    def recording_make_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        pinned.append(loader.pin_memory)
        return loader

    monkeypatch.setattr(run_train, "make_loader", recording_make_loader)
    assert run_train.main(tiny_train_args(tmp_path / "runs", "--device", ACCELERATOR)) == 0
    assert len(pinned) >= 2 and all(pin == (ACCELERATOR == "cuda") for pin in pinned)


def test_optimizer_multi_tensor_step_on_the_accelerator_equals_the_loop() -> None:
    """RMSpropTF on the accelerator: its default (multi-tensor kernels on CUDA) gives the loop's
    parameters, for a model's worth of parameter shapes and layouts."""
    from training.optim import RMSpropTF

    torch.manual_seed(0)
    model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY).to(ACCELERATOR,
                                                                              memory_format=torch.channels_last)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    results = []
    for foreach in (None, False):
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        opt = RMSpropTF([dict(params=params[::2]), dict(params=params[1::2], weight_decay=0.0)], lr=0.01,
                        momentum=0.9, eps=1e-3, weight_decay=1e-5, foreach=foreach)
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            opt.step()
        results.append(params)
    for default, loop in zip(*results):
        torch.testing.assert_close(default, loop, rtol=1e-6, atol=1e-7)
