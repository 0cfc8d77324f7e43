"""What the student is trained to match: the teacher's targets for a batch (per-layer hidden states,
a pooled embedding, next-token logits), the weighted loss against them, and the teacher cache that
keeps targets in host memory, within a bound, so that a batch seen again skips the teacher."""

from __future__ import annotations

import torch

from ..io.models import pooled_embedding
from .parallel import everywhere


def default_losses(head: str) -> tuple[tuple[str, float], ...]:
    """Per-layer hidden states for everyone, then what the model's output is for.

    Weights from bench/heal.py on MiniLM (hidden:3 + cosine recovered most per minute); models
    with a head take the same hidden weight, which has not been measured there.
    """
    return (("hidden", 3.0), ("cosine", 1.0)) if head == "base" else (("hidden", 3.0), ("kl", 1.0))


def teacher_targets(teacher, rows, losses: dict, device) -> dict:
    inputs, mask = rows
    outputs = teacher(**_to(inputs, device), output_hidden_states="hidden" in losses)
    goal = {}
    if "hidden" in losses:
        goal["hidden"] = [h.float() for h in outputs.hidden_states[1:]]
    if "cosine" in losses:
        goal["cosine"] = pooled_embedding(outputs, mask.to(device)).float()
    if "kl" in losses:
        goal["kl"] = outputs.logits.float()
    return goal


def student_loss(model, rows, goal: dict, losses: dict, temperature: float, device) -> torch.Tensor:
    """Weighted sum of per-sample means, so that the mean over a sharded batch is the global one."""
    inputs, mask = rows
    mask = mask.to(device)
    outputs = model(**_to(inputs, device), output_hidden_states="hidden" in losses)
    total = 0.0
    m = mask[..., None].float()
    if "hidden" in losses:
        per_layer = []
        for h, t in zip(outputs.hidden_states[1:], goal["hidden"]):
            err = (((h.float() - t) ** 2) * m).sum((1, 2)) / ((t ** 2) * m).sum((1, 2)).clamp(min=1e-12)
            per_layer.append(err)
        total = total + losses["hidden"] * torch.stack(per_layer).mean(0).mean()
    if "cosine" in losses:
        emb = pooled_embedding(outputs, mask)
        total = total + losses["cosine"] * (1 - (emb.float() * goal["cosine"]).sum(-1)).mean()
    if "kl" in losses:
        t = temperature
        logq = torch.log_softmax(outputs.logits.float() / t, -1)
        logp = torch.log_softmax(goal["kl"] / t, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # per position (tokens) or per sample
        if kl.dim() == 2:
            kl = (kl * mask).sum(1) / mask.sum(1).clamp(min=1)
        total = total + losses["kl"] * t * t * kl.mean()
    return total


class TeacherCache:
    """Batch index -> the teacher's targets, kept in host memory while they fit in ``bound`` bytes
    (when ``enabled``); ``bytes`` is what it holds. ``sharded``: under fsdp every process must rerun
    the (sharded) teacher for a batch, or none, so a batch is kept only where every process keeps it."""

    def __init__(self, enabled: bool, bound: int, sharded: bool):
        self.enabled, self.bound, self.sharded = enabled, bound, sharded
        self.kept: dict[int, dict] = {}
        self.bytes = 0

    def targets(self, index: int, teacher, rows, losses: dict, device, autocast) -> dict:
        """The teacher's targets for batch ``index`` (``rows``: this process's share) on ``device``."""
        goal = self.kept.get(index)
        if goal is None:
            with torch.no_grad(), autocast:
                goal = teacher_targets(teacher, rows, losses, device)
            size = _nbytes(goal)
            keep = self.enabled and self.bytes + size <= self.bound
            if self.sharded:  # every process must rerun the (sharded) teacher for a batch, or none
                keep = everywhere(keep, device)
            if keep:
                self.kept[index], self.bytes = _moved(goal, "cpu"), self.bytes + size  # host memory, bounded
        else:
            goal = _moved(goal, device)
        return goal


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _moved(goal: dict, device) -> dict:
    """The teacher's targets (tensors, or lists of them per layer) on ``device``."""
    return {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in goal.items()}


def _nbytes(goal: dict) -> int:
    return sum(t.numel() * t.element_size() for v in goal.values() for t in (v if isinstance(v, list) else [v]))
