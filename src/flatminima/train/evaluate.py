"""Loss and error of a classifier (or an output ensemble) over an in-memory data set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flatminima.data import ArrayDataset


def _batches(data: ArrayDataset, batch_size: int, device: torch.device):
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device, non_blocking=True)
        y = data.y[start : start + batch_size].to(device, non_blocking=True)
        yield x, y


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` on ``data`` in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    if len(data) == 0:
        raise ValueError("Cannot evaluate on an empty data set")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        for x, y in _batches(data, batch_size, device):
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            wrong += (out.argmax(1) != y).sum()
    finally:
        model.train(was_training)
    n = len(data)
    return float(loss_sum) / n, float(wrong) / n


@torch.no_grad()
def evaluate_ensemble(
    models: Sequence[nn.Module],
    data: ArrayDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Loss and error of the output ensemble: the mean of the members' softmax probabilities."""
    if not models:
        raise ValueError("evaluate_ensemble needs at least one model")
    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        loss_sum = 0.0
        wrong = 0
        for x, y in _batches(data, batch_size, device):
            probs = torch.stack([F.softmax(m(x).float(), dim=1) for m in models]).mean(0)
            loss_sum += float(F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum"))
            wrong += int((probs.argmax(1) != y).sum())
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    n = len(data)
    return loss_sum / n, wrong / n
