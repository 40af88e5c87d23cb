"""The training application: recipe pieces against their definitions, exact resume, the
reduced-resolution flow, robust data, and every named config."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_train
import run_validate
from conftest import ROOT, run_cli, run_clis, run_main, tiny_train_args
from models import create_model
from training.checkpoint import is_epoch_end, list_checkpoints, load_checkpoint
from training.config import (
    ConfigError,
    TrainConfig,
    check_config,
    config_names,
    field_names,
    from_dict,
    make_config,
    model_overrides,
    option,
    options_given,
    options_not_read,
    parse_args,
    resolve_config,
    training_resolution,
)
from training.mixing import BatchMixer, FixedCutMix
from training.optim import LRSchedule, RMSpropTF, build_optimizer, optimizer_from_config, parameter_groups


def _only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


# ---------------------------------------------------------------------------- optimizers and schedules


def test_rmsprop_tf_matches_its_definition() -> None:
    p0 = torch.tensor([1.0, -2.0, 0.5])
    grads = [torch.tensor([0.1, 0.2, -0.3]), torch.tensor([-0.4, 0.05, 0.6])]
    lr, decay, momentum, eps, wd = 0.01, 0.9, 0.8, 1e-3, 0.1
    param = torch.nn.Parameter(p0.clone())
    opt = RMSpropTF([param], lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=wd)
    # closed form, by hand
    p, ms, mom = p0.clone(), torch.ones(3), torch.zeros(3)
    for g in grads:
        g = g + wd * p
        ms = decay * ms + (1 - decay) * g * g
        mom = momentum * mom + lr * g / torch.sqrt(ms + eps)
        p = p - mom
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach(), p)
    # several parameters of different shapes in two groups, one without a gradient, step together
    # (the step is written in multi-tensor ops) exactly as each would alone
    torch.manual_seed(0)
    tensors = [torch.randn(3), torch.randn(4, 2), torch.randn(5), torch.randn(2, 2)]
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    together = RMSpropTF([dict(params=params[:2]), dict(params=params[2:], weight_decay=0.0)], lr=lr, decay=decay,
                         momentum=momentum, eps=eps, weight_decay=wd)
    alone = [torch.nn.Parameter(t.clone()) for t in tensors]
    singles = [RMSpropTF([a], lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=wd if i < 2 else 0.0)
               for i, a in enumerate(alone)]
    for _ in range(3):
        for i, (joint, single) in enumerate(zip(params, alone)):
            grad = None if i == 3 else torch.randn_like(joint)
            joint.grad, single.grad = grad, None if grad is None else grad.clone()
        together.step()
        for opt_alone in singles:
            opt_alone.step()
    for joint, single in zip(params, alone):
        torch.testing.assert_close(joint.detach(), single.detach(), rtol=0, atol=0)
    torch.testing.assert_close(params[3].detach(), tensors[3], rtol=0, atol=0)
    # and it is not torch's RMSprop (eps outside the root, mean square from 0)
    other = torch.nn.Parameter(p0.clone())
    torch_opt = torch.optim.RMSprop([other], lr=lr, alpha=decay, eps=eps, momentum=momentum, weight_decay=wd)
    for g in grads:
        other.grad = g.clone()
        torch_opt.step()
    assert not torch.allclose(other.detach(), p)


def test_rmsprop_tf_steps_as_timms_rmsprop_tf() -> None:
    """An independent implementation of the same optimizer: timm's RMSpropTF (mean square from 1,
    eps inside the root, LR inside the momentum), with the LR changed between steps, as the
    schedule does, and weight decay on one of two groups."""
    from timm.optim import RMSpropTF as TimmRMSpropTF

    torch.manual_seed(0)
    tensors = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64),
               torch.randn(2, 2, dtype=torch.float64)]
    ours_params = [torch.nn.Parameter(t.clone()) for t in tensors]
    their_params = [torch.nn.Parameter(t.clone()) for t in tensors]
    settings = dict(lr=0.05, momentum=0.9, eps=1e-3, weight_decay=1e-2)
    ours = RMSpropTF([dict(params=ours_params[:2]), dict(params=ours_params[2:], weight_decay=0.0)],
                     decay=0.953125, **settings)
    theirs = TimmRMSpropTF([dict(params=their_params[:2]), dict(params=their_params[2:], weight_decay=0.0)],
                           alpha=0.953125, **settings)
    for step in range(6):
        for opt in (ours, theirs):
            for group in opt.param_groups:
                group["lr"] = 0.05 * 0.8 ** step
        for mine, their in zip(ours_params, their_params):
            grad = torch.randn_like(mine)
            mine.grad, their.grad = grad, grad.clone()
        ours.step()
        theirs.step()
    for mine, their, start in zip(ours_params, their_params, tensors):
        assert not torch.allclose(mine, start)
        torch.testing.assert_close(mine.detach(), their.detach(), rtol=1e-12, atol=1e-12)


def test_rmsprop_tf_multi_tensor_step_equals_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The multi-tensor step (a GPU's default: one launch per op for all parameters) gives the
    loop's parameters bit for bit, with weight decay, two groups, a channels_last weight and a
    parameter without gradient; on the CPU the default is the loop, no faster there."""
    torch.manual_seed(0)
    tensors = [torch.randn(3), torch.randn(4, 2, 3, 3).contiguous(memory_format=torch.channels_last),
               torch.randn(5), torch.randn(2, 2)]
    runs = {}
    multi_tensor_updates = []
    foreach_sub = torch._foreach_sub_
    monkeypatch.setattr(torch, "_foreach_sub_", lambda *args: multi_tensor_updates.append(1) or foreach_sub(*args))
    for foreach in (True, False, None):
        params = [torch.nn.Parameter(t.clone()) for t in tensors]
        opt = RMSpropTF([dict(params=params[:2]), dict(params=params[2:], weight_decay=0.0)], lr=0.01, decay=0.9,
                        momentum=0.8, eps=1e-3, weight_decay=0.1, foreach=foreach)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for i, param in enumerate(params):
                param.grad = None if i == 3 else torch.randn(param.shape, generator=generator)
            opt.step()
        runs[foreach] = [param.detach() for param in params]
        assert len(multi_tensor_updates) == (6 if foreach else 0)  # 3 steps x 2 groups; CPU default: none
        multi_tensor_updates.clear()
    for multi, loop, default in zip(runs[True], runs[False], runs[None]):
        torch.testing.assert_close(multi, loop, rtol=0, atol=0)
        torch.testing.assert_close(default, loop, rtol=0, atol=0)
    assert not torch.equal(runs[True][0], tensors[0]) and torch.equal(runs[True][3], tensors[3])


def test_exponential_schedule_with_warmup() -> None:
    schedule = LRSchedule("exponential", steps_per_epoch=10, total_steps=1000, warmup_steps=50, decay=0.97,
                          decay_epochs=2.4)
    assert schedule(0) == pytest.approx(1 / 50)
    assert schedule(49) == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(0.97 ** math.floor(50 / 24))
    assert schedule(240) == pytest.approx(0.97**10)
    assert schedule(239) == pytest.approx(0.97**9)


def test_cosine_schedule() -> None:
    schedule = LRSchedule("cosine", steps_per_epoch=10, total_steps=110, warmup_steps=10)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)


def test_lr_follows_schedule_through_lambda_lr() -> None:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer("sgd", parameter_groups(model, 0.0, 0.0), lr=0.5)
    schedule = LRSchedule("exponential", steps_per_epoch=4, total_steps=40, warmup_steps=2, decay=0.5, decay_epochs=1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.5 * 0.5**0, 0.5, 0.25, 0.25, 0.25, 0.25, 0.125, 0.125])


def test_global_batch_lr_rule() -> None:
    cfg = make_config(resolve_config("efficientnet-b0-g16-gn"))
    assert cfg.micro_batch_size * cfg.gradient_accumulation * cfg.replicas == 768
    assert cfg.lr_per_image * 768 == pytest.approx(0.046875)


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_weight_decay_lands_only_on_intended_parameters(name: str) -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet-b0", width=0.25, depth=0.25, num_classes=4, group_size=16, expand_ratio=4,
                         norm="layer", proxy_norm=True)
    groups = parameter_groups(model, weight_decay=0.1, proxy_weight_decay=0.05)
    by_group = {g["group"]: g for g in groups}
    assert all(n.endswith(("proxy_beta", "proxy_gamma")) for n in by_group["proxy"]["names"])
    assert all(("conv" in n or "classifier" in n or "reduce" in n or "expand" in n) and n.endswith("weight")
               for n in by_group["decay"]["names"])
    no_decay = by_group["no_decay"]["names"]
    assert any(n.endswith("norm_act.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    # with zero gradients only the decay terms move parameters
    opt = build_optimizer(name, groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for group, decay in (("decay", 0.1), ("no_decay", 0.0), ("proxy", 0.05)):
        for pname in by_group[group]["names"]:
            p = dict(model.named_parameters())[pname].detach()
            moved = not torch.equal(p, before[pname])
            nonzero = bool(before[pname].abs().sum() > 0)
            assert moved == (decay > 0 and nonzero), (name, pname)


def test_fixed_cutmix_keeps_the_stated_share() -> None:
    torch.manual_seed(0)
    images = torch.stack([torch.full((3, 20, 20), float(i)) for i in range(4)])
    soft = torch.eye(4)
    mixed, labels = FixedCutMix(0.75)(images, soft)
    pasted = (mixed[:, 0] != images[:, 0]).float().mean(dim=(1, 2))
    torch.testing.assert_close(labels.sum(1), torch.ones(4))
    torch.testing.assert_close(labels[torch.arange(4), (torch.arange(4) - 1) % 4], pasted)
    assert float(pasted.max()) <= 0.25 + 1e-6


def test_mixup_produces_soft_labels() -> None:
    torch.manual_seed(0)
    mixer = BatchMixer(5, mixup_alpha=0.2)
    images, labels = mixer(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0]))
    assert labels.shape == (6, 5)
    torch.testing.assert_close(labels.sum(1), torch.ones(6))


# ---------------------------------------------------------------------------- configs and CLI


@pytest.mark.parametrize("name", [n for n in config_names() if n != "demo"])
def test_every_config_builds_and_takes_a_training_step(name: str) -> None:
    cfg = make_config({**resolve_config(name), "data": "generated"})
    check_config(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.model, **model_overrides(cfg, 10))
    opt = optimizer_from_config(cfg, model, 0.01)
    images, labels = BatchMixer(10, cfg.mixup_alpha, cfg.cutmix_lambda)(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
    loss.backward()
    before = model.classifier[1].weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.classifier[1].weight)


def test_paper_hyperparameters_in_configs() -> None:
    b0 = make_config(resolve_config("efficientnet-b0-g16-gn"))
    b4 = make_config(resolve_config("efficientnet-b4-g16-lnpn"))
    assert (b0.group_size, b0.expand_ratio, b0.norm, b0.proxy_norm) == (16, 4, "group", False)
    assert (b4.norm, b4.proxy_norm, b4.model) == ("layer", True, "efficientnet-b4")
    assert b0.mixup_alpha == 0.1 and b0.cutmix_lambda == 1.0 and b4.mixup_alpha == 0.2 and b4.cutmix_lambda < 1
    assert (b0.optimizer, b0.rmsprop_decay, b0.optimizer_eps, b0.momentum) == ("rmsprop", 0.953125, 1e-3, 0.9)
    assert (b0.lr_decay, b0.lr_decay_epochs, b0.warmup_epochs, b0.epochs) == (0.97, 2.4, 5.0, 350)
    g1 = make_config(resolve_config("efficientnet-b2-g1-bn"))
    assert (g1.group_size, g1.expand_ratio, g1.norm) == (1, 6, "batch")


def test_command_line_beats_config_beats_defaults() -> None:
    cfg = parse_args(["--config", "efficientnet-b2-g16-gn", "--lr-decay", "0.5", "--half-res-training"])
    assert cfg.model == "efficientnet-b2"  # from the config
    assert cfg.lr_decay == 0.5  # from the command line
    assert cfg.half_res_training is True
    assert cfg.crop_pct == TrainConfig().crop_pct  # default


def test_pipeline_splits_take_spaces_or_commas() -> None:
    """A comma list, as run_validate's --resolutions takes, names the same splits as separate words."""
    expected = ["blocks.2.0", "blocks.4.0"]
    assert parse_args(["--pipeline-splits", "blocks.2.0", "blocks.4.0"]).pipeline_splits == expected
    assert parse_args(["--pipeline-splits", "blocks.2.0,blocks.4.0"]).pipeline_splits == expected
    assert parse_args(["--pipeline-splits", "blocks.2.0, blocks.4.0,"]).pipeline_splits == expected
    assert make_config({"pipeline_splits": ["blocks.2.0,blocks.4.0"]}).pipeline_splits == expected
    assert parse_args([]).pipeline_splits == []


def test_half_resolution_follows_the_test_resolution() -> None:
    """--half-res-training at the model's native resolution trains at the paper's half resolution;
    at another --resolution, at the same proportion of it (never above the test resolution)."""
    assert training_resolution(make_config({"model": "efficientnet-b0", "half_res_training": True})) == 160
    assert training_resolution(make_config({"model": "efficientnet-b2", "half_res_training": True})) == 196
    scaled = make_config({"model": "efficientnet-b0", "half_res_training": True, "resolution": 112})
    assert training_resolution(scaled) == 80  # 160 × 112 / 224
    assert training_resolution(make_config({**dataclasses.asdict(scaled), "half_resolution": 96})) == 96
    assert training_resolution(make_config({**dataclasses.asdict(scaled), "half_res_training": False})) == 112
    check_config(make_config({**dataclasses.asdict(scaled), "data": "generated"}))
    with pytest.raises(ConfigError, match="not below the test resolution 112 px"):
        check_config(make_config({**dataclasses.asdict(scaled), "data": "generated", "half_resolution": 112}))


def test_saved_config_keeps_data_path_only_for_imagenet() -> None:
    """A run saved with --data demo and a --data-path (accepted, and ignored, before that pairing was
    refused) still loads; an ImageNet run keeps its folder."""
    old_demo = dataclasses.asdict(make_config({"data": "demo"}))
    old_demo["data_path"] = "/data/imagenet"
    loaded = from_dict(old_demo, "old run")
    assert loaded.data == "demo" and loaded.data_path is None
    check_config(loaded)
    imagenet = from_dict({**old_demo, "data": "imagenet"}, "run")
    assert imagenet.data_path == "/data/imagenet"


def test_unknown_config_and_keys_suggest_close_matches(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean: efficientnet-b2-g16-gn"):
        parse_args(["--config", "efficientnet-b2-g16-gm"])
    with pytest.raises(ConfigError, match="unknown option --lr-deacy.*--lr-decay"):
        parse_args(["--lr-deacy", "0.5"])
    for argv in (["demo"], ["--resolution", "32", "40"]):  # a word no option takes is not an "unknown option"
        with pytest.raises(ConfigError, match=f"^unexpected argument '{argv[-1]}': options are written --name VALUE"):
            parse_args(argv)
    bad = tmp_path / "configs.yml"
    bad.write_text("x:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'epoch'.*epochs"):
        resolve_config("x", bad)
    bad.write_text("x:\n  inherits: [demo, {a: 1}]\n")
    with pytest.raises(ConfigError, match="config 'x' in .*configs.yml: inherits must be a config name or a list"):
        resolve_config("x", bad)
    with pytest.raises(ConfigError, match="'epochs' must be an integer"):
        make_config({"epochs": "ten"})


def test_cli_user_errors_exit_2_without_traceback(tmp_path: Path, capsys) -> None:
    cases = [
        (["--config", "nope"], "unknown config"),
        (["--config", "demo", "--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
        (["--config", "demo", "--resolution", "8"], "--resolution must be at least"),
        (["--config", "demo", "--fine-tune-first-trainable-layer", "blocks.9"], "has no layer 'blocks.9'"),
        (["--config", "demo", "--norm", "instance"], "--norm must be one of"),
        (["--config", "demo", "--stochastic-depth", "1.5"], "--stochastic-depth must be at least 0 and below 1"),
        (["--config", "demo", "--depth", "-1"], "--depth must be positive"),
        (["--config", "demo", "--weight-decay", "-1"], "--weight-decay must not be negative"),
        (["--config", "demo", "--norm", "group", "--norm-groups", "7"], "cannot be built: norm_groups=7 does not divide"),
        (["--data", "imagenet", "--data-path", str(tmp_path / "missing")], "data path not found"),
        (["--config", "demo", "--data-path", str(tmp_path)], "--data-path is read only with --data imagenet"),
        (["--config", "demo", "--interpolation", "nearest"], "--interpolation must be bilinear or bicubic"),
        (["--config", "demo", "--nesterov"], "--nesterov is Nesterov momentum for --optimizer sgd with --momentum "
                                             "above 0, got --optimizer adamw --momentum 0.9"),
        (["--config", "demo", "--optimizer", "sgd", "--momentum", "0", "--nesterov"], "got --optimizer sgd --momentum 0"),
        (["--config", "demo", "--device", "mps"], "--device 'mps' is not a device"),  # (torch parses it; we don't run it)
        (["--config", "demo", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
        (["--config", "demo", "--momentum", "1.5"], "--momentum must be at least 0 and below 1, got 1.5"),
        (["--config", "demo", "--seed", str(2**32)], f"--seed must be from 0 to {2**32 - 1}, got {2**32}"),
        (["--config", "demo", "--seed", "-1"], "--seed must be from 0 to"),
    ]
    for args, needle in cases:
        code, stderr = run_main(run_train.main, [*args, "--output-dir", str(tmp_path / "runs")], capsys)
        assert code == 2 and needle in stderr, (args, stderr)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("run_train.py", "--config", "demo", "--output-dir", str(blocker / "runs"))
    assert result.returncode == 2 and "cannot create the run folder" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and blocker.read_text() == "not a folder"


def test_help_and_list_configs() -> None:
    *helps, listing = run_clis([["run_train.py", "--help"], ["run_validate.py", "--help"],
                                ["run_benchmark.py", "--help"], ["run_train.py", "--list-configs"]])
    listed = listing.stdout.split()
    result = helps[0]
    assert result.returncode == 0
    for script, text in zip(("run_train.py", "run_validate.py", "run_benchmark.py"), helps):  # every option explained
        assert "--device" in text.stdout and "__TEMP__" not in text.stdout, script
    for text in ("--half-res-training", "--fine-tune-first-trainable-layer", "--precision", "--resume"):
        assert text in result.stdout
    assert "default: 0.875" in result.stdout or "(default: 0.875)" in result.stdout
    assert "efficientnet-b2-g16-gn" in listed and "demo" in listed and "_base" not in listed
    assert len(listed) == 33
    import run_benchmark
    import run_validate

    for module, dataclass_type, text in zip((run_train, run_validate, run_benchmark),
                                            (TrainConfig, run_validate.ValidateConfig, run_benchmark.BenchmarkConfig),
                                            (h.stdout for h in helps)):
        # each option's help is its field's inline comment, not the section heading above it
        source = inspect.getsource(dataclass_type)
        entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=--)", text)}
        for f in dataclasses.fields(dataclass_type):
            comment = re.search(rf"^    {f.name}: .*?  # (.*)$", source, re.M)
            assert comment, f"{dataclass_type.__name__}.{f.name} has no inline comment for --help"
            assert " ".join(comment.group(1).split()) in entries[option(f.name)], (module.__name__, f.name)
        assert "----" not in text
        # the usage examples of the docstring keep their lines
        example = next(line for line in module.__doc__.splitlines() if line.startswith("    python "))
        assert example in text.splitlines(), module.__name__


def _assert_cites_a_section(hint: str) -> None:
    section = re.search(r"docs/benchmarks\.md ([AC]\.\d+)", hint).group(1)
    assert f"### {section} " in (ROOT / "docs" / "benchmarks.md").read_text()


@pytest.mark.parametrize("argv, unread", [
    (["--lr-decay", "0.5", "--lr-sched", "cosine"], ["--lr-decay"]),  # (argparse's prefix of --lr-schedule)
    (["--lr-decay=0.5", "--lr-decay-epochs", "3", "--lr-schedule", "exponential"], []),
    (["--optimizer", "sgd", "--optimizer-eps", "0.1", "--momentum", "0.5", "--rmsprop-decay", "0.9"],
     ["--rmsprop-decay", "--optimizer-eps"]),
    (["--momentum", "0.5"], ["--momentum"]),  # demo's optimizer is adamw
    (["--fine-tune-epochs", "0"], []),  # none asked for, none run
    (["--fine-tune-epochs", "3", "--fine-tune-batch-size", "8"], ["--fine-tune-epochs", "--fine-tune-batch-size"]),
    (["--half-res-training", "--fine-tune-epochs", "3", "--fine-tune-batch-size", "8"], []),
    (["--train-resolution", "48", "--fine-tune-lr-per-image", "0.001"], []),
    (["--nowandb", "--wandb-project", "x", "--pipeline-schedule", "1f1b"], ["--pipeline-schedule", "--wandb-project"]),
    (["--norm-groups", "8"], ["--norm-groups"]),  # demo's norm is layer
    (["--norm", "group", "--norm-groups", "8"], []),
    (["--half-resolution", "24"], ["--half-resolution"]),
    (["--half-res-training", "--half-resolution", "24"], []),
    (["--half-res-training", "--half-resolution", "24", "--train-resolution", "40"],
     ["--half-resolution", "--half-res-training"]),
    (["--generated-size", "64", "--hflip", "0"], ["--generated-size"]),
    (["--data", "generated", "--generated-size", "64", "--hflip", "0", "--crop-pct", "0.9", "--strict-images"],
     ["--strict-images", "--hflip", "--crop-pct"]),  # no image files
])
def test_options_the_run_does_not_read_are_named(argv: list[str], unread: list[str]) -> None:
    """Options the run's other settings leave unread changed nothing without a word."""
    argv = ["--config", "demo", *argv]
    assert [name for name, _ in options_not_read(parse_args(argv), options_given(argv, field_names()))] == unread


def test_speed_hints_where_settings_are_known_to_be_slow() -> None:
    """Eager LN+PN on a GPU, and fp16 training on a CPU, are told how to go faster; the advice is a
    valid command line that silences the note, and the section it cites exists. Other CPU runs,
    models without Proxy Norm and pipelines (which cannot be compiled) get no note."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    lnpn = {**resolve_config("efficientnet-b0-g16-lnpn"), "data": "generated"}
    hint = run_train.speed_hint(make_config(lnpn), cuda)
    assert hint and "--compile true --compile-mode reduce-overhead" in hint
    _assert_cites_a_section(hint)
    advised = make_config({**lnpn, "compile": True, "compile_mode": "reduce-overhead"})
    check_config(advised)
    assert run_train.speed_hint(advised, cuda) is None
    assert run_train.speed_hint(make_config({**lnpn, "compile": True}), cuda)  # default mode: no CUDA graphs
    assert run_train.speed_hint(make_config(lnpn), cpu) is None
    assert run_train.speed_hint(make_config(resolve_config("efficientnet-b0-g16-gn")), cuda) is None
    assert run_train.speed_hint(make_config({**lnpn, "pipeline_splits": ["blocks.3.0"]}), cuda) is None
    # fp16 on a CPU
    hint = run_train.speed_hint(make_config({**lnpn, "precision": "fp16"}), cpu)
    assert hint and hint.endswith("use --precision bf16")
    _assert_cites_a_section(hint)
    assert run_train.speed_hint(parse_args(["--config", "demo", "--precision", "bf16"]), cpu) is None
    assert "fp16" not in (run_train.speed_hint(make_config({**lnpn, "precision": "fp16"}), cuda) or "")


# ---------------------------------------------------------------------------- whole runs


def test_resume_after_epoch_is_bitwise_exact(tiny_args, tmp_path: Path) -> None:
    extra = ["--ema-decay", "0.9", "--mixup-alpha", "0.2", "--cutmix-lambda", "0.8", "--fine-tune-epochs", "0"]
    assert run_train.main(tiny_args(*extra, "--run-name", "straight")) == 0
    assert run_train.main(tiny_args(*extra, "--run-name", "cut", "--stop-after-steps", "3")) == 143
    cut = tmp_path / "runs" / "cut"
    assert [p.name for p in list_checkpoints(cut)] == ["checkpoint-000000003-train-epoch0001.pt"]
    assert run_train.main(tiny_args(*extra, "--run-name", "cut", "--resume", "auto")) == 0
    a = load_checkpoint(list_checkpoints(tmp_path / "runs" / "straight")[-1])
    b = load_checkpoint(list_checkpoints(cut)[-1])
    for key in ("model", "ema", "epoch_average"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a["progress"] == b["progress"]


def test_resume_mid_epoch_is_bitwise_exact(tiny_args, tmp_path: Path) -> None:
    extra = ["--mixup-alpha", "0.2", "--fine-tune-epochs", "0", "--workers", "2", "--checkpoint-every-steps", "1"]
    assert run_train.main(tiny_args(*extra, "--run-name", "straight")) == 0
    assert run_train.main(tiny_args(*extra, "--run-name", "cut", "--stop-after-steps", "4")) == 143
    assert run_train.main(tiny_args(*extra, "--run-name", "cut", "--resume", "auto")) == 0
    a = load_checkpoint(list_checkpoints(tmp_path / "runs" / "straight")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "runs" / "cut")[-1])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_log_without_progress_bars_gets_a_line_every_n_steps(tiny_args, capsys) -> None:
    """Where no bar shows (a job's log file, --progress false), --log-every N prints the running
    figures every N steps; the epoch's last step shows what the epoch's summary then reports."""
    assert run_train.main(tiny_args("--log-every", "1", "--run-name", "every")) == 0  # 2 epochs of 3 steps
    lines = capsys.readouterr().err.splitlines()
    steps = [line for line in lines if re.match(r"train epoch \d/2 step \d/3: ", line)]
    assert [line.split(":")[0] for line in steps] == [f"train epoch {e}/2 step {s}/3" for e in (1, 2) for s in (1, 2, 3)]
    for epoch in (1, 2):
        summary = next(line for line in lines if line.startswith(f"train epoch {epoch}/2: "))
        last = steps[3 * epoch - 1]
        for figure in (r"loss [\d.]+", r"train top-1 [\d.]+ %"):
            assert re.search(figure, last).group() == re.search(figure, summary).group(), (last, summary)
        assert re.search(r"lr \d\.\d{3}e[-+]\d\d$", last)
    for flag in ("0", "100"):  # none, or fewer steps than N
        assert run_train.main(tiny_args("--log-every", flag, "--epochs", "1", "--run-name", f"n{flag}",
                                        "--lr-schedule", "cosine", "--lr-decay", "0.5")) == 0
        err = capsys.readouterr().err
        assert " step " not in err
        # (and, in the same runs, the notes on options a run does not read)
        assert "note: --lr-decay is not read by this run: only --lr-schedule exponential reads it, not cosine" in err
        assert ("note: --fine-tune-epochs is not read by this run: this run trains at its test resolution, and the "
                "fine-tune phase follows training below it") in err  # (tiny_args asks for 1 epoch of it)


def test_keep_epoch_checkpoints_keeps_the_newest_and_trains_the_same(tiny_args, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    """--keep-epoch-checkpoints 2 leaves the two newest epoch checkpoints (over both phases) and
    changes nothing else: stopped and resumed with it, a run ends with the weights of a run that
    kept them all. Keeping them all on a disk too small for them is warned about once, at the first."""
    runs = tmp_path / "runs"
    real_disk_usage = shutil.disk_usage

    def small_disk(path):  # the run folders' disk has 1 MiB free; other folders (/dev/shm) are as they are
        usage = real_disk_usage(path)
        return usage._replace(free=2**20) if runs in Path(path).parents else usage

    monkeypatch.setattr(run_train.shutil, "disk_usage", small_disk)
    extra = ["--half-res-training", "--epochs", "3"]  # 3 epochs at 24 px, 1 of fine-tuning at 32
    assert run_train.main(tiny_args(*extra, "--run-name", "all")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "each epoch checkpoint takes" in line]
    every = [p.name for p in list_checkpoints(runs / "all")]
    assert len(every) == 4 and len(warnings) == 1
    size = (runs / "all" / every[0]).stat().st_size
    assert f"takes {size / 2**20:.0f} MiB and 3 more are due ({3 * size / 2**20:.0f} MiB)" in warnings[0]
    assert "has 1 MiB free" in warnings[0] and "--keep-epoch-checkpoints N" in warnings[0]

    keep = ["--keep-epoch-checkpoints", "2", "--run-name", "newest"]
    assert run_train.main(tiny_args(*extra, *keep, "--stop-after-steps", "5")) == 143  # mid-way through epoch 2
    assert run_train.main(tiny_args(*extra, *keep, "--resume", "auto")) == 0
    assert "each epoch checkpoint takes" not in capsys.readouterr().err
    kept = [p for p in list_checkpoints(runs / "newest") if is_epoch_end(p)]
    assert [p.name for p in kept] == every[-2:]  # the last training epoch and the fine-tuning epoch
    a, b = (load_file(runs / name / "model.safetensors") for name in ("all", "newest"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_replaces_the_metrics_of_steps_trained_again(tiny_args, tmp_path: Path) -> None:
    """Records written after the checkpoint a run resumes from are dropped, not repeated."""
    args = tiny_args("--half-res-training", "--run-name", "again")
    assert run_train.main(args) == 0
    run = tmp_path / "runs" / "again"

    def records() -> list[tuple]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [tuple(map(json.loads(line).get, ("event", "phase", "epoch", "step", "weights"))) for line in lines]

    straight, straight_rows = records(), (run / "metrics.csv").read_text().splitlines()
    assert len(straight) == 5 and len(straight_rows) == 4  # 3 epochs, 2 validations; a header and 3 rows
    first_epoch, *later = list_checkpoints(run)
    assert "train-epoch0001" in first_epoch.name and later
    for path in [*later, run / "final.json", run / "model.safetensors"]:
        path.unlink()
    assert run_train.main([*args, "--resume", "auto"]) == 0
    assert records() == straight
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[:4] for row in rows] == [row.split(",")[:4] for row in straight_rows]


def test_deterministic_kernels_for_the_run_only(tiny_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--deterministic turns PyTorch's deterministic algorithms on for the run, with cuBLAS's
    workspace fixed (CUDA refuses them without), and gives an in-process caller its own setting
    back. On the CPU, whose kernels are deterministic already, it trains as the default run does."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # (so that teardown removes what the run sets)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    during = []
    real_validate = run_train.validate
    monkeypatch.setattr(run_train, "validate",
                        lambda *a: during.append(torch.are_deterministic_algorithms_enabled()) or real_validate(*a))
    short = ["--epochs", "1", "--fine-tune-epochs", "0"]
    assert run_train.main(tiny_args(*short, "--deterministic", "--run-name", "deterministic")) == 0
    assert during and all(during)
    assert not torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    during.clear()
    assert run_train.main(tiny_args(*short, "--run-name", "default")) == 0
    assert during and not any(during)
    runs = tmp_path / "runs"
    deterministic, default = (load_file(runs / name / "model.safetensors") for name in ("deterministic", "default"))
    assert all(torch.equal(deterministic[name], default[name]) for name in default)


@pytest.mark.parametrize("extra, averages, note", [
    ([], ["averaged"], "the epoch-averaged weights"),  # no fine-tuning: the final weights are the averaged ones
    (["--epoch-average-decay", "0", "--ema-decay", "0.5"], ["ema"], "the EMA weights"),
    (["--ema-decay", "0.5"], ["ema", "averaged"], "the epoch-averaged weights"),  # both validated; on from the epochs'
    (["--half-res-training"], ["averaged"], "the last epoch's weights"),  # the last fine-tune epoch was validated
    (["--half-res-training", "--validate-every", "0"], ["averaged"], None),  # it was not: the final weights are
])
def test_the_final_weights_are_validated_once(extra, averages, note, tiny_args, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Where the weights a run ends with were validated and not changed since (the averaged weights
    without fine-tuning; the last epoch's when it was validated), that validation is reported for the
    final weights too, instead of a second pass over the validation set. Each average kept is
    validated under the name run_validate's --weights gives it; the run goes on from the epoch average."""
    calls = []
    real_validate = run_train.validate
    monkeypatch.setattr(run_train, "validate", lambda *a: calls.append(1) or real_validate(*a))
    assert run_train.main(tiny_args(*extra, "--run-name", "run")) == 0
    run = tmp_path / "runs" / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validated_epochs = [r for r in records if r["event"] == "epoch" and "val_top1" in r]
    validations = {r["weights"]: r for r in records if r["event"] == "validation"}
    assert list(validations) == [*averages, "final"]
    final = validations["final"]
    passes = len(averages) + (note is None)
    assert validated_epochs and len(calls) == len(validated_epochs) + passes  # per epoch, then averages (+ final)
    if note is not None:  # the figures reported for the final weights are those of the validation reused
        keys = ("top1", "top5", "loss")
        reused = {"the epoch-averaged weights": [validations.get("averaged", {}).get(key) for key in keys],
                  "the EMA weights": [validations.get("ema", {}).get(key) for key in keys],
                  "the last epoch's weights": [validated_epochs[-1]["val_" + key] for key in keys]}[note]
        assert [final[key] for key in keys] == reused
        assert f"validation (final weights: {note}, validated above)" in capsys.readouterr().err
    assert json.loads((run / "final.json").read_text())["top1"] == final["top1"]
    if "ema" in averages:  # what was validated as "ema" is the EMA the checkpoint holds, scored by run_validate
        prefix = tmp_path / "ema-sweep"
        assert run_validate.main(["--checkpoint", str(list_checkpoints(run)[-1]), "--weights", "ema", "--progress",
                                  "false", "--timed-batches", "1", "--output-prefix", str(prefix)]) == 0
        swept = json.loads(Path(f"{prefix}.json").read_text())[0]
        assert (swept["top1"], swept["loss"]) == pytest.approx((validations["ema"]["top1"], validations["ema"]["loss"]))
    if "--half-res-training" not in extra:  # the exported weights are the average the run went on from
        last = load_checkpoint(list_checkpoints(run)[-1])
        average = last["epoch_average" if "averaged" in averages else "ema"]
        exported = load_file(run / "model.safetensors")
        assert all(torch.equal(tensor, average["module." + name]) for name, tensor in exported.items())


def test_half_res_training_fine_tunes_head_at_test_resolution(tiny_args, tmp_path: Path) -> None:
    assert run_train.main(tiny_args("--half-res-training", "--run-name", "half")) == 0
    run = tmp_path / "runs" / "half"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [(r["phase"], r["resolution"]) for r in epochs] == [("train", 24), ("train", 24), ("fine_tune", 32)]
    assert [r["weights"] for r in records if r["event"] == "validation"] == ["averaged", "final"]
    # fine-tuning started from the averaged weights and changed only the head and classifier
    averaged = load_checkpoint(next(p for p in list_checkpoints(run) if "train-epoch0002" in p.name))["epoch_average"]
    final = load_file(run / "model.safetensors")
    changed = {name.split(".")[0] for name, tensor in final.items() if not torch.equal(tensor, averaged["module." + name])}
    assert changed == {"head", "classifier"}
    assert json.loads((run / "final.json").read_text())["resolution"] == 32
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("phase,epoch,step,resolution,lr")
    saved = load_checkpoint(list_checkpoints(run)[-1])["config"]
    assert saved["half_res_training"] is True and (run / "config.yaml").is_file()
    # the run folder's config.yaml, given back to --config, is the run's config again
    assert dataclasses.asdict(parse_args(["--config", str(run / "config.yaml")])) == saved


def _assert_exponential_average(checkpoints: list[dict], key: str, decay: float) -> None:
    """checkpoints[k][key] holds a_0 = w_0, a_k = d·a_(k−1) + (1 − d)·w_k over their raw weights w_k."""
    expected: dict[str, torch.Tensor] = {}
    for k, checkpoint in enumerate(checkpoints):
        for name, weight in checkpoint["model"].items():
            if weight.is_floating_point():
                expected[name] = weight.double() if k == 0 else decay * expected[name] + (1 - decay) * weight.double()
        averaged = checkpoint[key]
        if k > 0:  # (an average, not the latest weights)
            assert not torch.equal(averaged["module.head.conv.weight"], checkpoint["model"]["head.conv.weight"])
        for name, value in expected.items():
            torch.testing.assert_close(averaged[f"module.{name}"].double(), value, rtol=1e-6, atol=1e-7,
                                       msg=f"{key} {name} at checkpoint {k}")


def test_weight_averages_follow_their_closed_form(tiny_args, tmp_path: Path) -> None:
    """The paper's average of epoch checkpoints (decay d per epoch) and the per-step EMA (decay per
    optimizer step), each against its closed form over the raw weights the run saved: a
    checkpoint after every step, and one at the end of every epoch."""
    args = tiny_args("--epochs", "3", "--epoch-average-decay", "0.6", "--ema-decay", "0.8", "--fine-tune-epochs", "0",
                     "--checkpoint-every-steps", "1", "--keep-checkpoints", "100", "--run-name", "avg")
    assert run_train.main(args) == 0
    paths = list_checkpoints(tmp_path / "runs" / "avg")
    epochs = [load_checkpoint(path) for path in paths if "-train-epoch" in path.name]
    by_step = {checkpoint["progress"]["step"]: checkpoint for checkpoint in map(load_checkpoint, paths)}
    steps = [by_step[step] for step in sorted(by_step)]  # (an epoch's end may have a step and an epoch checkpoint)
    assert len(steps) == 9 and len(epochs) == 3, [path.name for path in paths]
    _assert_exponential_average(epochs, "epoch_average", 0.6)
    _assert_exponential_average(steps, "ema", 0.8)


def test_config_file_extends_named_configs_and_is_checked(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("inherits: [efficientnet-b2-g16-gn]\nepochs: 30\nlr_decay: 0.9\n")
    cfg = parse_args(["--config", str(mine), "--lr-decay", "0.5"])
    assert (cfg.model, cfg.norm, cfg.epochs, cfg.lr_decay) == ("efficientnet-b2", "group", 30, 0.5)
    assert cfg.config == "mine"  # run folders are named after the file, not its parent
    for text, needle in [("epochs: [1\n", "is not valid YAML"), ("- 1\n- 2\n", "must map options to values"),
                         ("epoch: 3\n", "unknown option 'epoch' (did you mean: epochs"),
                         ("inherits: demo0\n", "unknown config 'demo0'"), ("epochs: many\n", "option 'epochs' must be"),
                         ("inherits: 5\n", "inherits must be a config name or a list of them, got 5")]:  # (a TypeError)
        mine.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(needle)):
            parse_args(["--config", str(mine)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "missing.yml")])
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="folder.yaml is a folder: give a YAML file of options"):
        parse_args(["--config", str(tmp_path / "folder.yaml")])
    with pytest.raises(ConfigError, match="not a name in configs.yml, and a file of options must end in .yaml"):
        parse_args(["--config", str(tmp_path)])  # (a run folder, say)
    mine.write_bytes(b"\xff\xfeepochs: 3\n")  # (a UTF-16 file, say)
    with pytest.raises(ConfigError, match="mine.yaml is not UTF-8 text"):
        parse_args(["--config", str(mine)])
    # `config: NAME` starts from NAME's options, as --config NAME does (it was a label only: a B0 ran);
    # PyYAML reads 1e-3 as a string (YAML 1.1 floats need a dot): a float option takes it as a number
    mine.write_text("config: efficientnet-b2-g16-gn\nepochs: 30\nlr: 1e-3\nlr_decay: 9.5E-1\n")
    cfg = parse_args(["--config", str(mine)])
    assert (cfg.model, cfg.norm, cfg.epochs, cfg.lr, cfg.lr_decay) == ("efficientnet-b2", "group", 30, 1e-3, 0.95)
    assert cfg.config == "efficientnet-b2-g16-gn"
    mine.write_text("epochs: 1e2\n")  # not for an integer option
    with pytest.raises(ConfigError, match="option 'epochs' must be an integer, got '1e2'"):
        parse_args(["--config", str(mine)])


def test_run_folder_is_never_overwritten(tiny_args, tmp_path: Path) -> None:
    args = tiny_args("--run-name", "once", "--epochs", "1", "--fine-tune-epochs", "0")
    assert run_train.main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "once").iterdir()}
    assert run_train.main(args) == 2
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "once").iterdir()}
    assert before == after


def _write_messy_folder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "validation"):
        for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, size in enumerate([(50, 40), (33, 61), (80, 80), (45, 45)]):
                Image.new("RGB", size, colour).save(folder / f"rgb{i}.jpg")
            Image.new("L", (40, 30), 128).save(folder / "gray.jpg")
            Image.new("CMYK", (36, 36), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
            Image.new("RGBA", (40, 40), (*colour, 128)).save(folder / "png_inside.JPEG", format="PNG")
            Image.new("P", (40, 40)).save(folder / "palette.png")
            (folder / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")


def _flat_imagenet_val(folder: Path, count: int) -> list[str]:
    """ImageNet's validation set as distributed, in miniature: `count` JPEGs in one folder."""
    from PIL import Image

    folder.mkdir(parents=True)
    names = [f"ILSVRC2012_val_{index:08d}.JPEG" for index in range(1, count + 1)]
    for index, name in enumerate(names):
        Image.new("RGB", (12, 10), (index * 40, 0, 0)).save(folder / name, "JPEG")
    return names


def test_imagenet_validation_images_are_sorted_into_class_folders(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/sort_imagenet_val.py, from Kaggle's LOC_val_solution.csv or from the devkit: the
    folder becomes one that `--data imagenet` reads; wrong labels move nothing; an interrupted run
    is finished by running it again."""
    import numpy as np
    from scipy.io import savemat

    from datasets.image_folder import find_classes, list_samples
    spec = importlib.util.spec_from_file_location("sort_imagenet_val", ROOT / "scripts" / "sort_imagenet_val.py")
    sort_imagenet_val = importlib.util.module_from_spec(spec)  # (by path: `scripts` is not a package)
    spec.loader.exec_module(sort_imagenet_val)

    val = tmp_path / "val"
    names = _flat_imagenet_val(val, 5)
    wnids = ["n01440764", "n01443537", "n01440764", "n09999999", "n01443537"]
    solution = val / "LOC_val_solution.csv"  # (beside the images, as unpacked: not an image, left alone)
    solution.write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(name).stem},{wnid} 1 2 30 40 {wnid} 5 6 7 8 \n" for name, wnid in zip(names, wnids)) + "\n")  # a blank last line
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("id,label\n")
    unlabelled = tmp_path / "short.csv"
    unlabelled.write_text("".join(solution.read_text().splitlines(keepends=True)[:-2]))  # (the last row, blank line)
    for labels, message in [(bad_header, "does not start with Kaggle's header"),
                            (unlabelled, "1 image(s) in")]:
        assert sort_imagenet_val.main([str(val), "--labels", str(labels)]) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in val.iterdir() if p.is_dir()) == []  # nothing moved
    # interrupted after one image: running again finishes
    (val / wnids[0]).mkdir()
    (val / names[0]).rename(val / wnids[0] / names[0])
    assert sort_imagenet_val.main([str(val), "--labels", str(solution)]) == 0
    assert "moved 4 image(s) into class folders (1 already sorted); 3 classes" in capsys.readouterr().out
    classes = find_classes(val)
    assert classes == sorted(set(wnids))
    samples, _ = list_samples(val, classes)
    assert sorted((Path(path).name, classes[label]) for path, label in samples) == sorted(zip(names, wnids))
    assert sort_imagenet_val.main([str(val), "--labels", str(solution)]) == 0  # again: nothing to do
    assert "moved 0 image(s) into class folders (5 already sorted)" in capsys.readouterr().out

    # the devkit: ILSVRC2012_IDs in file order, mapped by meta.mat's leaf synsets
    val = tmp_path / "val-devkit"
    names = _flat_imagenet_val(val, 3)
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n2\n")
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.array([(1, "n01440764", "tench", "", 0, np.zeros(0), 0, 1300),
                        (2, "n01443537", "goldfish", "", 0, np.zeros(0), 0, 1300),
                        (1001, "n00001740", "entity", "", 2, np.array([1, 2]), 18, 0)],  # not a class
                       dtype=[(field, "O") for field in fields])
    savemat(devkit / "data" / "meta.mat", {"synsets": synsets.reshape(-1, 1)})
    assert sort_imagenet_val.main([str(val), "--devkit", str(devkit)]) == 0
    assert sorted(str(p.relative_to(val)) for p in val.rglob("*.JPEG")) == [
        f"n01440764/{names[1]}", f"n01443537/{names[0]}", f"n01443537/{names[2]}"]
    (val / "n01440764" / names[1]).rename(val / "n01443537" / names[1])  # a wrongly sorted image is named
    assert sort_imagenet_val.main([str(val), "--devkit", str(devkit)]) == 2
    assert f"{names[1]} is labelled n01440764, not n01443537" in capsys.readouterr().err


def test_messy_image_folder_trains_and_reports_corrupt_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_messy_folder(data)
    result = run_cli(
        "run_train.py", "--config", "demo", "--data", "imagenet", "--data-path", str(data), "--width", "0.25",
        "--depth", "0.25", "--resolution", "32", "--epochs", "2", "--micro-batch-size", "4", "--workers", "1",
        "--fine-tune-epochs", "0", "--progress", "false", "--output-dir", str(tmp_path / "runs"), "--run-name", "m",
    )
    assert result.returncode == 0, result.stderr
    assert "corrupt.jpg" in result.stderr and "Traceback" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "runs" / "m" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_images"] for r in records if r["event"] == "epoch" and r.get("skipped_images")]
    assert sum(skipped) >= 1 and set(skipped) == {1}  # the one corrupt file, once in each epoch that read it
    assert result.stderr.count(", 1 image skipped") == len(skipped)  # each such epoch's line, in the singular
    # the run's ImageNet folder stays in its config; validating on other data must not need it
    other = run_cli("run_validate.py", "--checkpoint", str(tmp_path / "runs" / "m"), "--data", "generated",
                    "--resolutions", "32", "--output-prefix", str(tmp_path / "sweep"))
    assert other.returncode == 0, other.stderr
    strict = run_cli(
        "run_train.py", "--config", "demo", "--data", "imagenet", "--data-path", str(data), "--width", "0.25",
        "--depth", "0.25", "--resolution", "32", "--epochs", "2", "--micro-batch-size", "4", "--workers", "0",
        "--fine-tune-epochs", "0", "--progress", "false", "--output-dir", str(tmp_path / "runs"), "--strict-images",
    )
    assert strict.returncode == 2 and "corrupt.jpg" in strict.stderr and "Traceback" not in strict.stderr


def test_resume_uses_checkpoint_settings_and_warns_about_others(tiny_args, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--fine-tune-epochs", "0", "--run-name", "w"]
    assert run_train.main(tiny_args(*base, "--stop-after-steps", "3")) == 143
    capsys.readouterr()
    # a checkpoint resumes in its own run folder: another --run-name was ignored without a word
    stopped = list_checkpoints(tmp_path / "runs" / "w")[-1]
    assert run_train.main(tiny_args("--fine-tune-epochs", "0", "--run-name", "v", "--resume", str(stopped))) == 2
    assert f"continues the run in its folder {tmp_path / 'runs' / 'w'}, not in --run-name v" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "v").exists()
    assert run_train.main(tiny_args(*base, "--resume", "auto", "--label-smoothing", "0.3")) == 0
    err = capsys.readouterr().err
    assert "ignoring --label-smoothing" in err
    saved = load_checkpoint(list_checkpoints(tmp_path / "runs" / "w")[-1])["config"]
    assert saved["label_smoothing"] == pytest.approx(0.1)  # the checkpoint's value was used
    # resuming a finished run does nothing, and says so
    metrics = (tmp_path / "runs" / "w" / "metrics.jsonl").read_text()
    assert run_train.main(tiny_args(*base, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert "has already finished" in err and "not applied" not in err
    assert (tmp_path / "runs" / "w" / "metrics.jsonl").read_text() == metrics
    # ... and says which options it did not apply (more epochs, say), and how to train on
    assert run_train.main(tiny_args(*base, "--resume", "auto", "--epochs", "9")) == 0
    assert (f"note: --epochs not applied to the finished run; to train on from its weights, start a new run "
            f"with --initial-weights {tmp_path / 'runs' / 'w'}") in capsys.readouterr().err
    assert (tmp_path / "runs" / "w" / "metrics.jsonl").read_text() == metrics


_PAGE_FAULT_PROBE = """
import resource, sys, torch
import torch.nn.functional as F
from models import create_model
from training.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.manual_seed(0)
model = create_model("efficientnet-b0", width=0.5, depth=0.5, num_classes=10)
x, y = torch.randn(16, 3, 96, 96), torch.randint(10, (16,))
def step():
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
step(); step()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults), sum(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_retained_host_memory_is_reused_without_page_faults() -> None:
    """Training steps after the first reuse freed memory instead of faulting fresh pages in
    (the feature maps here are ~30 MB a step; docs/benchmarks.md has the full-size effect)."""
    root = Path(__file__).resolve().parent.parent
    faults = {}
    for mode in ("return", "retain"):
        done = subprocess.run([sys.executable, "-c", _PAGE_FAULT_PROBE, mode], cwd=root, capture_output=True,
                              text=True, check=True)
        fewest, total = map(int, done.stdout.split()[-2:])
        faults[mode] = dict(fewest=fewest, total=total)
    # glibc's default maps big blocks fresh and unmaps them on free; its thresholds adapt, so one
    # step may fault little, but 8 steps fault thousands of pages
    assert faults["return"]["total"] > 5000, faults
    # retained: a step that faults no page at all (one step may still grow the heap once)
    assert faults["retain"]["fewest"] <= 100 and faults["retain"]["total"] < faults["return"]["total"] / 4, faults


@pytest.mark.parametrize("length, world_size", [(10, 1), (10, 3), (355, 2), (7, 4), (2, 3)])
def test_sampler_shards_cover_every_sample(length: int, world_size: int) -> None:
    from datasets import SeededSampler

    def shards(**kwargs) -> list[list[int]]:
        return [[index for index, _ in SeededSampler(length, 5, rank=rank, world_size=world_size, **kwargs)]
                for rank in range(world_size)]

    # training: equal shards (every rank runs the same steps), padded by repeating the permutation's start
    padded = shards()
    assert len({len(shard) for shard in padded}) == 1 and len(padded[0]) == math.ceil(length / world_size)
    assert sorted(set(sum(padded, []))) == list(range(length))
    # evaluation: each sample exactly once, shards within one sample of each other, lengths as iterated
    exact = shards(shuffle=False, pad=False)
    assert sorted(sum(exact, [])) == list(range(length))
    assert max(map(len, exact)) - min(map(len, exact)) <= 1
    assert [len(SeededSampler(length, 5, rank=r, world_size=world_size, pad=False)) for r in range(world_size)] == \
        list(map(len, exact))
    # resuming mid-epoch: the rest of the same epoch's shard, samples and seeds alike
    for rank in range(world_size):
        sampler = SeededSampler(length, 5, rank=rank, world_size=world_size)
        sampler.set_epoch(3)
        whole = list(sampler)
        skip = min(2, len(whole))
        sampler.set_epoch(3, start=skip)
        assert list(sampler) == whole[skip:] and len(sampler) == len(whole) - skip


def _jpeg_with_fine_detail(path: Path, width: int, height: int) -> Path:
    """Smooth colour fields plus a grating of period 3 px: a crop keeps the grating only if it is
    decoded with enough pixels (at half scale its period is 1.5 px, beyond what the pixels hold)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    smooth = sum(np.sin(x * rng.uniform(0.002, 0.02) + rng.uniform(0, 6)) *
                 np.cos(y * rng.uniform(0.002, 0.02) + rng.uniform(0, 6)) for _ in range(4))
    grating = np.sin(2 * np.pi * x / 3) * np.sin(2 * np.pi * y / 3)
    pixels = 128 + 40 * smooth[..., None] * np.array([1.0, 0.6, -0.8]) + 50 * grating[..., None]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
    return path


def test_crop_decoder_draws_and_crops_as_random_resized_crop(tmp_path: Path) -> None:
    from datasets import DEMO_ROOT, RandomCropDecoder, load_image, train_transform
    from datasets.image_folder import seeded

    # PNGs, and at 96 px a JPEG whose crops are all under twice the resolution: nothing is decoded at reduced scale
    pngs = [str(p) for p in sorted((DEMO_ROOT / "train").glob("*/*.png"))[:6]]
    jpeg = str(_jpeg_with_fine_detail(tmp_path / "small.jpg", 200, 150))
    for resolution, paths in ((24, pngs), (96, [*pngs, jpeg])):
        whole = train_transform(resolution, 0.1)
        after_crop, decode = train_transform(resolution, 0.1, crop=False), RandomCropDecoder(resolution, 0.1)
        for path in paths:
            for seed in range(4):
                with seeded(seed):
                    expected = whole(load_image(path))
                with seeded(seed):
                    assert torch.equal(after_crop(decode(path)), expected), (path, resolution, seed)


def test_crop_decoder_decodes_at_reduced_scale_only_where_the_crop_keeps_its_detail(tmp_path: Path) -> None:
    from datasets import RandomCropDecoder, load_image, train_transform
    from datasets.image_folder import seeded

    path = str(_jpeg_with_fine_detail(tmp_path / "photo.jpg", 512, 384))
    resolution = 128
    whole = train_transform(resolution, 0.05)
    after_crop, decode = train_transform(resolution, 0.05, crop=False), RandomCropDecoder(resolution, 0.05)
    errors, reduced = [], 0
    for seed in range(40):
        with seeded(seed):
            expected = whole(load_image(path))
        with seeded(seed):
            got = after_crop(decode(path))
        reduced += not torch.equal(got, expected)
        errors.append(float((got - expected).abs().mean()))
    # crops of at least 256 px were decoded at half scale, the rest in full, and every crop kept its
    # grating: decoding the whole image at half scale first (its short side, 192 px, still covers
    # the resolution) gives crops under 256 px a mean error of up to 0.22 here
    assert 10 <= reduced <= 30, reduced
    assert max(errors) < 0.08, max(errors)


def test_fine_tuning_trains_on_the_validation_preprocessing(tmp_path: Path) -> None:
    """The fine-tune at the test resolution exists to match test time: same pixels as validation
    (a JPEG decoded at reduced scale, then resized, would differ)."""
    import types

    from datasets import ImageFolderDataset, eval_transform

    (tmp_path / "a").mkdir()
    _jpeg_with_fine_detail(tmp_path / "a" / "photo.jpg", 512, 384)
    cfg = TrainConfig()
    fine_tune = types.SimpleNamespace(test_preprocessing=True, resolution=128)
    train = ImageFolderDataset(tmp_path, transform=None)
    run_train.set_phase_preprocessing(train, cfg, fine_tune)
    validation = ImageFolderDataset(tmp_path, eval_transform(128, cfg.crop_pct))
    assert torch.equal(train[(0, 7)][0], validation[0][0])


def test_loaders_pin_host_memory_only_for_a_cuda_device() -> None:
    from datasets import SeededSampler, make_loader

    data = torch.utils.data.TensorDataset(torch.zeros(4, 3))
    for device, pinned in ((None, False), (torch.device("cpu"), False), (torch.device("cuda", 0), True)):
        assert make_loader(data, 2, SeededSampler(4, 0), 0, device=device).pin_memory is pinned


# ---------------------------------------------------------------------------- experiment tracking


class _FakeWandb:
    """Stands in for the wandb module: records what the application sends it."""

    def __init__(self, fail_on_log: bool = False) -> None:
        self.init_kwargs: dict = {}
        self.logged: list[tuple[dict, int | None]] = []
        self.finished = 0
        self.fail_on_log = fail_on_log

    def Settings(self, **kwargs):  # noqa: N802 - wandb's name
        return kwargs

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values: dict, step: int | None = None) -> None:
        if self.fail_on_log:
            raise ConnectionError("tracking server unreachable")
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished += 1


@pytest.mark.parametrize("api_key, wandb_mode, mode", [
    (None, None, "offline"), ("k" * 40, None, "online"),
    ("k" * 40, "offline", None), (None, "online", None),  # WANDB_MODE, the user's own setting, is left to wandb
], ids=["no-key", "key", "key-WANDB_MODE-offline", "WANDB_MODE-online"])
def test_wandb_gets_every_record_offline_unless_a_key_is_set(tiny_args, tmp_path: Path, monkeypatch, api_key,
                                                             wandb_mode, mode) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for name, value in [("WANDB_API_KEY", api_key), ("WANDB_MODE", wandb_mode)]:
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    assert run_train.main(tiny_args("--run-name", "tracked", "--wandb", "--fine-tune-epochs", "0")) == 0
    run_dir = tmp_path / "runs" / "tracked"
    assert fake.init_kwargs["mode"] == mode
    assert fake.init_kwargs["dir"] == str(run_dir) and fake.init_kwargs["name"] == "tracked"
    assert fake.init_kwargs["resume"] == "allow" and fake.init_kwargs["id"] == (run_dir / "wandb-id").read_text()
    assert fake.init_kwargs["config"]["run_name"] == "tracked"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(fake.logged) == len(records) and fake.finished == 1
    for (values, step), record in zip(fake.logged, records):  # the numbers of each record, at its step
        assert step == record.get("step")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        if record["event"] == "validation":  # each set of weights validated at the last step: keys of its own
            numbers = {(k if k == "step" else f"{record['weights']}/{k}"): v for k, v in numbers.items()}
        assert values == numbers
    assert any("val_top1" in values for values, _ in fake.logged)
    finals = [values for values, _ in fake.logged if "final/top1" in values]
    assert len(finals) == 1 and finals[0]["final/top1"] == json.loads((run_dir / "final.json").read_text())["top1"]
    assert any("averaged/top1" in values for values, _ in fake.logged)


def test_a_resumed_run_continues_its_wandb_run(tiny_args, tmp_path: Path, monkeypatch) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = tiny_args("--run-name", "resumed", "--wandb", "--fine-tune-epochs", "0")
    assert run_train.main([*args, "--stop-after-steps", "3"]) == 143
    first = dict(fake.init_kwargs)
    assert run_train.main([*args, "--resume", "auto"]) == 0
    assert fake.init_kwargs["id"] == first["id"] and fake.init_kwargs["resume"] == "allow"
    other = _FakeWandb()  # another run gets its own W&B run
    monkeypatch.setitem(sys.modules, "wandb", other)
    assert run_train.main(tiny_args("--run-name", "other", "--wandb", "--fine-tune-epochs", "0", "--epochs", "1")) == 0
    assert other.init_kwargs["id"] != first["id"] and len(first["id"]) == 16


def test_a_failing_tracker_never_stops_training(tiny_args, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(fail_on_log=True))
    assert run_train.main(tiny_args("--run-name", "untracked", "--wandb", "--fine-tune-epochs", "0")) == 0
    assert "wandb logging failed, continuing without it: tracking server unreachable" in capsys.readouterr().err
    assert (tmp_path / "runs" / "untracked" / "final.json").is_file()


def test_real_wandb_writes_an_offline_run_without_the_network(tmp_path: Path, monkeypatch) -> None:
    """The installed wandb, not a stand-in: the calls match its API and offline mode needs no network."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # (the user's own mode would be used)
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    result = run_cli("run_train.py", *tiny_train_args(tmp_path / "runs", "--run-name", "w", "--wandb",
                                                      "--fine-tune-epochs", "0", "--epochs", "1"), env=env)
    assert result.returncode == 0, result.stderr
    assert "wandb could not start" not in result.stderr and "wandb logging failed" not in result.stderr
    offline = list((tmp_path / "runs" / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


# ---------------------------------------------------------------------------- --initial-weights


def _same_tensors(got: dict, expected: dict, skip: str = "\0") -> None:
    assert got.keys() == expected.keys()
    for name in got:
        if not name.startswith(skip):
            assert torch.equal(got[name], expected[name]), name


def test_initial_weights_from_a_run_or_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run of 0 epochs from --initial-weights ends with exactly those weights, and scores what the
    run that made them scored; a classifier of another size starts afresh, the rest is loaded."""
    runs = tmp_path / "runs"
    assert run_train.main(tiny_train_args(runs, "--fine-tune-epochs", "0", "--epochs", "1", "--run-name", "a")) == 0
    exported = load_file(runs / "a" / "model.safetensors")
    checkpoint = list_checkpoints(runs / "a")[-1]
    for name, source, expected in (("b", runs / "a" / "model.safetensors", exported),
                                   ("c", checkpoint, load_checkpoint(checkpoint)["model"]),
                                   ("e", runs / "a", exported)):  # a run folder: its model.safetensors
        args = tiny_train_args(runs, "--epochs", "0", "--run-name", name, "--initial-weights", str(source))
        assert run_train.main(args) == 0
        _same_tensors(load_file(runs / name / "model.safetensors"), expected)
        assert f"initial weights: {source}" in capsys.readouterr().err
    final = {name: json.loads((runs / name / "final.json").read_text()) for name in ("a", "b")}
    assert final["b"]["top1"] == final["a"]["top1"] and final["b"]["loss"] == final["a"]["loss"]

    args = tiny_train_args(runs, "--epochs", "0", "--run-name", "d", "--num-classes", "12",
                           "--initial-weights", str(runs / "a" / "model.safetensors"))
    assert run_train.main(args) == 0
    assert "its classifier (10 classes) is left out and this run's (12) starts from random weights" in \
        capsys.readouterr().err
    other = load_file(runs / "d" / "model.safetensors")
    assert other["classifier.1.weight"].shape == (12, exported["classifier.1.weight"].shape[1])
    _same_tensors(other, {**exported, **{k: other[k] for k in other if k.startswith("classifier.")}})


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_initial_weights_from_torchvision_or_timm(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  library: str) -> None:
    """torchvision's or timm's ImageNet file (1000 classes; torchvision's a .pth, timm's the
    model.safetensors it publishes) starts a G1-BN run on the 10 demo classes: every tensor but the
    classifier is theirs, BatchNorm's running statistics included."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    from models.external_weights import external_to_ours

    torch.manual_seed(3)
    if library == "torchvision":
        theirs = torchvision.models.efficientnet_b0()
        path = tmp_path / "efficientnet_b0.pth"
        torch.save(theirs.state_dict(), path)
    else:
        theirs = timm.create_model("efficientnet_b0")
        path = tmp_path / "model.safetensors"
        save_file(theirs.state_dict(), str(path), metadata={"format": "pt"})
    g1_bn = ["--width", "1.0", "--depth", "1.0", "--group-size", "1", "--expand-ratio", "6", "--norm", "batch",
             "--proxy-norm", "false", "--epochs", "0", "--run-name", "e", "--initial-weights", str(path)]
    assert run_train.main(tiny_train_args(tmp_path / "runs", *g1_bn)) == 0
    assert f"({library}'s weights); its classifier (1000 classes) is left out" in capsys.readouterr().err
    got = load_file(tmp_path / "runs" / "e" / "model.safetensors")
    ours = create_model("efficientnet-b0", group_size=1, expand_ratio=6, norm="batch")
    _same_tensors(got, external_to_ours(ours, theirs.state_dict(), library), skip="classifier.")
    assert got["classifier.1.weight"].shape[0] == 10


def test_initial_weights_are_checked_before_work_and_not_needed_to_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    runs = tmp_path / "runs"
    weights = tmp_path / "w.pt"
    torch.save(create_model("efficientnet-b0", width=0.25, depth=0.25, num_classes=10).state_dict(), weights)
    torn = tmp_path / "torn.pth"
    torn.write_bytes(weights.read_bytes()[:1000])
    timm_file = tmp_path / "timm_b0.pth"  # timm's layout: mapped onto G1-BN models only
    torch.save(timm.create_model("efficientnet_b0", num_classes=10).state_dict(), timm_file)
    cases = [
        (tmp_path / "missing.pt", "--initial-weights: weights file not found"),
        (torn, f"--initial-weights: weights file {torn} is truncated or corrupt"),
        (weights, "does not fit this config's model"),  # G1 e6 GN weights for the demo's G16 LN+PN model
        (timm_file, "the timm state dict holds 360 tensors and the model"),
    ]
    for source, message in cases:
        assert run_train.main(tiny_train_args(runs, "--run-name", "bad", "--initial-weights", str(source))) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (runs / "bad").exists()
    demo = tiny_train_args(runs, "--run-name", "a", "--epochs", "1", "--fine-tune-epochs", "0")
    assert run_train.main(demo) == 0
    exported = tmp_path / "start.safetensors"
    (runs / "a" / "model.safetensors").rename(exported)
    assert run_train.main(tiny_train_args(runs, "--run-name", "bad", "--initial-weights", str(runs / "a"))) == 2
    assert f"--initial-weights {runs / 'a'} is a folder without a model.safetensors" in capsys.readouterr().err
    args = tiny_train_args(runs, "--run-name", "r", "--initial-weights", str(exported))
    assert run_train.main([*args, "--stop-after-steps", "1"]) == 143
    exported.unlink()  # a resume takes its weights from the checkpoint
    assert run_train.main([*args, "--resume", "auto"]) == 0
