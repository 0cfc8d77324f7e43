"""What a healing run is told: ``HealConfig``, each field's default, help text and flag written once
(its metadata; the heal command's options are built from them, cli/options.py).

Budgets: ``steps`` 0 is block-local healing alone; ``tokens`` counts real tokens over all processes;
``minutes`` counts a resumed run's earlier time. The global batch is split evenly over processes.
The teacher's cached outputs are bounded by ``cache_bytes`` in host memory (a 7B model's hidden
states fill a GPU in about 20 batches); batches past it have their teacher rerun. fsdp is torch's
fully_shard: student and teacher sharded layer by layer, gathered for their turn. Block-local
healing (heal/local.py) runs before the end-to-end loop; ``local_steps`` None takes the model's
default (distill.default_local_steps), and ``local_share`` spreads its share of ``minutes`` over the
layers (SmolLM2: end-to-end steps after it bought nothing in CPU-minutes; docs/healing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import VloraError
from ..io.models import resolve_device

TRAINABLE = ("increments", "bases", "dense")
LOSSES = ("cosine", "hidden", "kl")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class HealConfig:
    """How a VLoRA file is healed (heal/distill.py): budgets, optimiser, losses, teacher cache, evals
    and saves, block-local healing, precision and parallelism."""

    steps: int = option(150, "--steps", "Optimiser steps: the budget and the length of the learning-rate schedule.")
    tokens: int | None = option(None, "--tokens", "Also stop after this many training tokens.")
    minutes: float | None = option(None, "--minutes", "Also stop after this much wall time; the schedule decays over it.")
    lr: float = option(3e-4, "--lr", "AdamW learning rate of bases and factors (warm-up, then cosine decay).")
    lr_dense: float | None = option(None, "--lr-dense", "Learning rate of the stack's biases and norms (default: --lr).")
    batch_size: int = option(32, "--batch-size", "Samples per step, over all processes.")
    max_length: int = option(128, "--max-length", "Tokens per sample.")
    warmup: int = option(10, "--warmup", "Steps of linear warm-up.")
    clip: float = option(1.0, help="Gradient-norm clipping.")
    losses: tuple[tuple[str, float], ...] = option((), help="(name, weight) pairs; () is the model's default "
                                                   "(default_losses). The command line's --loss.")
    temperature: float = option(2.0, "--temperature", "Softmax temperature of the kl loss.")
    train: tuple[str, ...] = option(TRAINABLE, help="What trains: increments, bases, dense (1-D stack parameters). "
                                    "The command line's --freeze names the rest.")
    cache_teacher: bool = option(True, "--cache-teacher/--no-cache-teacher",
                                 "Keep the teacher's outputs per batch (memory) or rerun it every step (time).")
    cache_bytes: int = option(4 * 2**30, help="Bound of the teacher's cached outputs in bytes, kept in host memory. "
                              "The command line's --teacher-cache.")
    eval_every: int = option(0, "--eval-every", "Steps between evals (0: before and after only).")
    eval_samples: int = option(64, "--eval-samples", "Evaluate on the data's first N samples.")
    save_every: int = option(25, "--save-every", "Steps between saves of the resumable state (OUT.state).")
    precision: str = option("auto", "--precision",
                            "bf16: the teacher and frozen tensors in bfloat16, what trains in float32, the maths under "
                            "bf16 autocast; fp32: all float32; auto: bf16 on CUDA, fp32 elsewhere.")
    parallel: str = option("ddp", "--parallel", "Under torchrun: ddp (each process holds student and teacher whole) or "
                           "fsdp (both sharded layer by layer with fully_shard).")
    checkpointing: bool = option(False, "--gradient-checkpointing",
                                 "Recompute layers in the backward pass: less memory, more time.")
    quantization_aware: bool = option(True, "--quantization-aware/--no-quantization-aware",
                                      "Quantized files: train through a straight-through quantizer, so the loss is "
                                      "that of the integers written (default), or train in float and round once at "
                                      "the end.")
    local_steps: int | None = option(None, "--local-steps",
                                     "Block-local healing first: each layer of the stack trained, in order, to give "
                                     "the teacher's layer output, this many steps a layer (0: none). Default for "
                                     "causal LMs: 32, or with --minutes as many as --local-share of them allows; 0 "
                                     "otherwise.")
    local_lr: float = option(3e-4, "--local-lr",
                             "Adam learning rate of block-local healing (cosine decay over each layer's steps).")
    local_batch_size: int = option(8, "--local-batch-size", "Samples a step of block-local healing, over all processes.")
    local_samples: int = option(256, "--local-samples", "Training samples block-local healing uses (windows of "
                                "--max-length tokens for a causal LM).")
    local_share: float = option(1.0, "--local-share", "With --minutes: the share of them block-local healing may take; "
                                "the end-to-end loop has the rest.")
    seed: int = option(0, "--seed", "Seed for the order of batches.")
    device: str = option("auto", "--device", "auto (CUDA when present), cpu, cuda or cuda:N.")

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.max_length < 2:
            raise VloraError("`heal.steps` must be at least 0, `heal.batch_size` at least 1, `heal.lr` positive, `heal.max_length` at least 2")
        if not (isinstance(self.cache_bytes, int) and self.cache_bytes >= 0):
            raise VloraError(f"`heal.cache_bytes` must be a whole number of bytes, at least 0, not {self.cache_bytes!r}")
        if (self.tokens is not None and self.tokens < 1) or (self.minutes is not None and not self.minutes > 0):
            raise VloraError("`heal.tokens` and `heal.minutes` must be positive")
        unknown = set(self.train) - set(TRAINABLE)
        if unknown or not self.train:
            raise VloraError(f"`heal.train` takes some of {', '.join(TRAINABLE)}, not {sorted(unknown) or 'nothing'}")
        for name, weight in self.losses:
            if name not in LOSSES or not weight > 0:
                raise VloraError(f"`heal.losses` takes {', '.join(LOSSES)} with a positive weight (name:weight), not {name}:{weight}")
        if (self.local_steps is not None and self.local_steps < 0) or not self.local_lr > 0 \
                or self.local_samples < 1 or self.local_batch_size < 1 or not 0 < self.local_share <= 1:
            raise VloraError("`heal.local_steps` must be >= 0, `heal.local_lr` positive, `heal.local_samples` and "
                             "`heal.local_batch_size` >= 1, `heal.local_share` in (0, 1]")
        if self.eval_every < 0 or self.save_every < 1 or self.eval_samples < 1 or not self.temperature > 0:
            raise VloraError("`heal.eval_every` must be >= 0, `heal.save_every` and `heal.eval_samples` >= 1, `heal.temperature` positive")
        if self.precision not in PRECISIONS or self.parallel not in PARALLEL:
            raise VloraError(f"`heal.precision` takes {', '.join(PRECISIONS)} and `heal.parallel` {', '.join(PARALLEL)}, "
                             f"not {self.precision!r} and {self.parallel!r}")
        resolve_device(self.device)

    def low_precision(self, device: torch.device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    def budget_fields(self) -> set[str]:
        """Fields a resumed run may change: budgets and where it runs, not what it computes."""
        return {"steps", "tokens", "minutes", "device", "eval_every", "eval_samples", "save_every", "cache_bytes"}

