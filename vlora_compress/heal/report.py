"""HealReport: what a healing run did and what it bought, as ``heal`` returns it and the CLI prints
it (the ``healing`` block of a ``--distill`` report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .parallel import local_bytes


@dataclass(frozen=True)
class HealReport:
    source: str
    output: str
    steps: int
    tokens: int
    seconds: float
    device: str
    processes: int
    losses: list[float] = field(default_factory=list)  # mean loss per stretch of 10 steps
    evals: list[dict] = field(default_factory=list)  # {"step", "value"} of the tracked metric
    metric: str | None = None
    higher_is_better: bool | None = None  # of the metric
    before: float | None = None
    after: float | None = None  # of the written tensors (the best eval when evals ran)
    best_step: int | None = None
    resumed_from: int | None = None
    eval_data: str | None = None  # what the evals scored: the eval data, or the slice held back
    teacher_cache_bytes: int = 0  # the teacher's targets kept in host memory (at most cache_bytes)
    local: dict | None = None  # block-local healing (heal/local.py's LocalReport), when it ran
    memory: dict = field(default_factory=dict)  # bytes this process held at the end (memory)
    precision: str = "fp32"  # what ran: bf16 or fp32 (config.precision resolved on the device)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def memory(student, teacher, trainable: dict, opt, cache: int) -> dict:
    """Bytes this process holds: the teacher's and student's parameters (their shards when
    sharded), the student's frozen integers held packed, of the parameters what trains, its
    gradients' room and the optimizer's state, the teacher cache."""
    return {
        "teacher": local_bytes(teacher.parameters()),
        "student": local_bytes(student.parameters()),
        # frozen integer bases and factors, held as the file stores them (heal.student.frozen_integers)
        "student_packed": local_bytes(student.vlora_store.packed.buffers()),
        "trained": local_bytes(trainable.values()),
        "optimizer": local_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()),
        "teacher_cache": cache,
    }
