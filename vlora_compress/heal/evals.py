"""Scoring during healing: vlora-eval's default task for the model on held-out data, student against
teacher, and keeping the best step's tensors so that healing never writes a file worse by its own
measure."""

from __future__ import annotations

from pathlib import Path

from ..evaluate.scoring import EvalConfig, default_task, evaluate_models
from ..io.models import load_preprocessor
from .config import HealConfig
from .parallel import gather
from .state import State


class Evaluator:
    """vlora-eval's default task for the model, on held-out data, student against teacher."""

    def __init__(self, data, teacher_dir: Path, student, teacher_model, config: HealConfig, autocast):
        self.data, self.student, self.teacher, self.autocast = data, student, teacher_model, autocast
        self.tok = load_preprocessor(teacher_dir)
        # vlora-eval's defaults, so the figures are the ones vlora-eval gives for the written file
        self.config = EvalConfig(task=default_task(teacher_dir), samples=config.eval_samples)
        self.name, self.higher_is_better = None, True

    def __call__(self) -> float:
        was_training, store = self.student.training, self.student.vlora_store
        was_aware = store.quantization_aware
        self.student.eval()
        store.quantization_aware = True  # score what would be written, even when training in float
        try:
            with self.autocast:  # the precision it trains in (bf16: its frozen half is bf16)
                _, metrics = evaluate_models([self.student, self.teacher], self.tok, self.data, self.config)
        finally:
            self.student.train(was_training)
            store.quantization_aware = was_aware
        self.name, self.higher_is_better = metrics[0].name, metrics[0].higher_is_better
        return metrics[0].model

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


def track(state: State, evaluator: Evaluator, trainable, phase: str | None = None, keep: bool = True) -> None:
    """Score now; a new best keeps its tensors (gathered from every process when sharded; kept
    only where ``keep``: rank 0, which writes)."""
    value = evaluator()
    state.evals.append({"step": state.step, "value": value, **({"phase": phase} if phase else {})})
    if state.best is None or evaluator.better(value, state.best["value"]):
        tensors = gather(trainable, keep)
        state.best = {"step": state.step, "value": value, "tensors": tensors, "index": len(state.evals) - 1}
