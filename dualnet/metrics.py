"""Scoring: class, sum and joint (both right) accuracy plus the summed cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Split

EVAL_BATCH = 4096


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split: Split, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Score ``model`` on a split with fixed numbers, on the split's device.

    Returns:
        ``loss`` (mean CE(class) + CE(sum)), ``class_acc``, ``sum_acc``, ``joint_acc``
        (fractions in [0, 1]) and the integer counts ``class_correct``,
        ``sum_correct``, ``joint_correct`` and ``n``.

    Raises:
        ValueError: the split is empty, or has no fixed numbers (the training split).
    """
    if len(split) == 0:
        raise ValueError("cannot score an empty split (val_size=0 holds out no validation images)")
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=split.labels.device)
    counts = torch.zeros(3, dtype=torch.long, device=split.labels.device)
    sums = split.sums
    for start in range(0, len(split), batch_size):
        part = slice(start, start + batch_size)
        class_logits, sum_logits = model(split.images[part], split.numbers[part])
        loss += (F.cross_entropy(class_logits.float(), split.labels[part], reduction="sum")
                 + F.cross_entropy(sum_logits.float(), sums[part], reduction="sum"))
        class_ok = class_logits.argmax(1) == split.labels[part]
        sum_ok = sum_logits.argmax(1) == sums[part]
        counts += torch.stack([class_ok.sum(), sum_ok.sum(), (class_ok & sum_ok).sum()])
    model.train(was_training)
    n = len(split)
    class_correct, sum_correct, both_correct = (int(c) for c in counts)
    return {"loss": float(loss) / n, "class_acc": class_correct / n, "sum_acc": sum_correct / n,
            "joint_acc": both_correct / n, "class_correct": class_correct, "sum_correct": sum_correct,
            "joint_correct": both_correct, "n": n}
