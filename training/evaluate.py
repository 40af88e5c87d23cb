"""Validation: top-1, top-5 and loss over a loader, in eval mode without autograd."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    progress: bool = False,
    description: str = "validate",
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    seen = skipped = 0
    # summed on the device, read once at the end: no wait for the GPU after every batch
    correct1, correct5 = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels, skipped_files in tqdm(loader, desc=description, disable=None if progress else True, leave=False):
        skipped += len(skipped_files)
        if labels.numel() == 0:
            continue
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast_context(device, precision):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum()
        correct5 += (top == labels[:, None]).any(dim=1).sum()
        seen += labels.numel()
    model.train(was_training)
    if seen == 0:
        return dict(top1=float("nan"), top5=float("nan"), loss=float("nan"), images=0, skipped=skipped)
    return dict(top1=100.0 * int(correct1) / seen, top5=100.0 * int(correct5) / seen, loss=float(loss_sum) / seen,
                images=seen, skipped=skipped)
