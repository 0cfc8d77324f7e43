"""What each step trains on and how fast: batches of texts of similar length, a shuffle each epoch
that the step number alone decides (so a resumed run agrees), the learning rate's warm-up and
cosine decay, and whether the budget (steps, tokens, minutes) is spent."""

from __future__ import annotations

import math

import torch

from .config import HealConfig
from .state import State


def length_batches(tok, texts: list[str], batch_size: int, limit: int) -> list[tuple[dict, torch.Tensor]]:
    """Full batches of texts of similar length: less padding, so more real tokens per second."""
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=limit)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    size = min(batch_size, len(texts))
    out = []
    for start in range(0, len(order) - size + 1, size):
        chunk = [texts[i] for i in order[start:start + size]]
        enc = tok(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        out.append((dict(enc), enc["attention_mask"].bool()))
    return out


def batch_index(step: int, n: int, seed: int) -> int:
    """A fresh shuffle of the batches each epoch, from the step number alone (so resume agrees)."""
    epoch, pos = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[pos])


def spent(state: State, config: HealConfig, elapsed: float) -> bool:
    return (state.step >= config.steps or (config.tokens is not None and state.tokens >= config.tokens)
            or (config.minutes is not None and elapsed >= 60 * config.minutes))


def set_lr(opt, state: State, config: HealConfig, elapsed: float, local_seconds: float = 0.0) -> None:
    """Warm-up, then cosine decay over whichever budget is being used up fastest (of the minutes,
    those left after block-local healing)."""
    if state.step < config.warmup:
        factor = (state.step + 1) / config.warmup
    else:
        used = (state.step - config.warmup) / max(1, config.steps - config.warmup)
        if config.tokens:
            used = max(used, state.tokens / config.tokens)
        if config.minutes:
            used = max(used, (elapsed - local_seconds) / max(1e-9, 60 * config.minutes - local_seconds))
        factor = 0.5 * (1 + math.cos(math.pi * min(1.0, used)))
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
