"""Evaluate a model on local data, side by side with its reference (the original).

Four tasks: ``embedding`` (mean cosine of pooled embeddings to the reference, Spearman on scored
sentence pairs), ``perplexity`` (causal LMs, strided windows), ``classification`` (accuracy, and
agreement with the reference) and ``logits`` (KL divergence and top-1 agreement with the reference).
Every metric carries a ``drop``: how much worse the model is than the reference, positive = worse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..io.checkpoint import open_checkpoint
from ..io.data import read_corpus, read_labelled, read_pairs, read_texts
from ..errors import VloraError
from ..io.models import (batches, config_folder, head_of, load_model, load_preprocessor, model_device, pooled_embedding,
                     resolve_device, takes_text, token_limit)
from ..progress import Progress

TASKS = ("embedding", "perplexity", "classification", "logits")
COMPARE = ("int8", "int4", "gptq", "svd")  # the alternatives a compress report may score beside its file
DEFAULT_COMPARE = ("int8", "int4", "gptq")  # those it scores unless told (gptq: when calibrated)
RUNTIMES = ("expanded", "packed", "packed-kernels")


@dataclass(frozen=True)
class Metric:
    name: str
    model: float
    reference: float | None = None
    higher_is_better: bool = True

    @property
    def drop(self) -> float | None:
        if self.reference is None:
            return None
        return self.reference - self.model if self.higher_is_better else self.model - self.reference


@dataclass(frozen=True)
class EvalReport:
    task: str
    data: str
    model: str
    reference: str | None
    samples: int
    metrics: list[Metric] = field(default_factory=list)
    quantized: dict | None = None  # the quantization-only baseline: scheme, group_size, stack_bytes
    runtime: dict | None = None  # a VLoRA file run packed: {"kind": "packed", "held_bytes", "file_bytes"}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = [{**asdict(m), "drop": m.drop} for m in self.metrics]
        return d

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)

    def render(self, console: Console) -> None:
        render_eval(self.to_dict(), console)


def markdown_eval(report: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"**{report['task']}** on `{Path(report['data']).name}` ({report['samples']} samples){_rtn(report)}", "",
             "| metric | model | reference | drop (+ = worse) |", "|---|---:|---:|---:|"]
    lines += [f"| {m['name']} | {fmt(m['model'])} | {fmt(m['reference'])} | {fmt(m['drop'])} |"
              for m in report["metrics"]]
    return "\n".join(lines) + "\n"


def _rtn(report: dict) -> str:
    q, run = report.get("quantized"), report.get("runtime")
    if run:
        return f"; run {run['kind']}: {run['held_bytes']:,} bytes held, file {run['file_bytes']:,}"
    if not q:
        return ""
    group = f" groups of {q['group_size']}" if q["group_size"] else " per row"
    return f"; model = the original, stacks {q['scheme']}{group} round-to-nearest ({q['stack_bytes']:,} stack bytes)"


def render_eval(report: dict, console: Console) -> None:
    """The compressed model beside its reference, with the drop; from a report dict (as in JSON)."""
    table = Table(title=f"{report['task']} on {Path(report['data']).name} ({report['samples']} samples){_rtn(report)}")
    for col in ("metric", "model", "reference", "drop (+ = worse)"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for m in report["metrics"]:
        table.add_row(m["name"], fmt(m["model"]), fmt(m["reference"]), fmt(m["drop"]))
    console.print(table)


@dataclass(frozen=True)
class EvalConfig:
    task: str = "embedding"
    batch_size: int = 32
    max_length: int = 128
    samples: int | None = None  # the file's first N samples; None = all
    quantize: str = "none"  # int8 | int4: score the model with its layer stacks round-to-nearest quantized
    group_size: int = 128
    device: str = "auto"  # where the models run: auto (CUDA when present), cpu, cuda or cuda:N
    runtime: str = "expanded"  # a VLoRA file: expanded (dense weights, as vlora-expand writes them), packed
    # (factored, integers held as stored: runtime/packed.py; the model at the file's size) or packed-kernels
    # (the same through torch's int8/int4 weight-only matmuls, bfloat16 activations)
    compare: tuple[str, ...] = DEFAULT_COMPARE  # compress --eval: alternatives scored beside the file
    # (evaluate/alternatives.py): int8, int4 (alone, round-to-nearest), gptq (int4 alone rounded by GPTQ on the
    # file's calibration, when calibrated), svd (whitened per-layer SVD at its bytes)

    def __post_init__(self):
        if self.task not in TASKS:
            raise VloraError(f"`eval.task` must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.batch_size < 1 or self.max_length < 2 or (self.samples is not None and self.samples < 1):
            raise VloraError("`eval.batch_size` and `eval.samples` must be at least 1, `eval.max_length` at least 2")
        if self.runtime not in RUNTIMES:
            raise VloraError(f"`eval.runtime` must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        object.__setattr__(self, "compare", tuple(self.compare))
        unknown = [c for c in self.compare if c not in COMPARE]
        if unknown:
            raise VloraError(f"`eval.compare` takes {', '.join(COMPARE)}, not {unknown[0]!r}")
        from ..fit.integers import check_scheme

        check_scheme(self.quantize, self.group_size)


def default_task(config_dir: str | Path) -> str:
    """What a model's head suggests: perplexity for causal LMs, logits for classifiers, else embedding."""
    from ..io.models import _config, hf

    head = head_of(_config(hf(), config_folder(config_dir)))
    return {"causal-lm": "perplexity", "sequence-classification": "logits",
            "image-classification": "logits"}.get(head, "embedding")


def task_head(task: str) -> str | None:
    """The head a task loads the model with: the LM head for perplexity, none (hidden states) for
    embeddings, else the checkpoint's own."""
    return {"perplexity": "causal-lm", "embedding": "base"}.get(task)


def evaluate(model: str | Path, data: str | Path, config: EvalConfig = EvalConfig(),
             reference: str | Path | None = None, config_dir: str | Path | None = None,
             progress: bool = False) -> EvalReport:
    """Score ``model`` (a dense folder, or a file beside or with ``config_dir``) and its reference."""
    torch.manual_seed(0)
    if config.task == "logits" and reference is None:
        raise VloraError("`eval.task` logits compares against the original: add `reference`")
    model = Path(model)
    config_dir = _config_dir(model, reference, config_dir)
    preprocessor = load_preprocessor(config_dir)
    head = task_head(config.task)
    device = resolve_device(config.device)
    runtime = None
    if config.runtime != "expanded" and not model.is_dir():
        from ..runtime.factored import factored_bytes, load_factored

        models = [load_factored(model, config_dir, head, kernels=config.runtime == "packed-kernels").to(device)]
        runtime = {"kind": config.runtime, "held_bytes": factored_bytes(models[0]), "file_bytes": model.stat().st_size}
    else:
        models = [load_model(model, None if model.is_dir() else config_dir, head).to(device)]
    quantized = None
    if config.quantize != "none":
        stack_bytes = quantize_stacks(models[0], model, config.quantize, config.group_size)
        quantized = {"scheme": config.quantize, "group_size": config.group_size if config.quantize != "int8" else None,
                     "stack_bytes": stack_bytes}
    if reference is not None:
        ref = Path(reference)
        models.append(load_model(ref, None if ref.is_dir() else config_dir, head).to(device))
    samples, metrics = evaluate_models(models, preprocessor, data, config, progress)
    return EvalReport(config.task, str(data), str(model), str(reference) if reference else None, samples, metrics,
                      quantized, runtime)


def quantize_stacks(loaded, path: Path, scheme: str, group_size: int) -> int:
    """The quantization-only baseline, in place: every matrix that compress would factorise,
    round-to-nearest at ``scheme`` (rows of the stored matrix as the channels). Returns the stack's
    bytes so stored, scales included."""
    from ..io.models import param_for_key
    from ..fit.integers import fake_quantize
    from ..plan import matrix_bytes
    from ..io.stacks import find_stacks

    with open_checkpoint(path) as ckpt:
        if ckpt.is_vlora:
            raise VloraError(f"{path}: `eval.quantize` scores an original model; this is a VLoRA file")
        stacks = find_stacks(ckpt.infos)
        total = 0
        for stack in stacks:
            for fam in stack.families:
                for layer in fam.layers:
                    key = fam.key(layer)
                    param = param_for_key(loaded, key, ckpt.read)
                    if param is None:
                        raise VloraError(f"{path}: cannot find {key} in the model")
                    with torch.no_grad():
                        param.copy_(fake_quantize(param.detach(), scheme, group_size).reshape(param.shape))
                    total += matrix_bytes(fam.shape, fam.dtype, scheme, group_size)
    return total


def evaluate_models(models: list, preprocessor, data: str | Path, config: EvalConfig,
                    progress: bool = False, memo: dict | None = None) -> tuple[int, list[Metric]]:
    """(samples, metrics) for loaded models, the first scored, the second (if any) the reference.

    Healing calls this with the model in training, so mid-run evals are the same as vlora-eval's.
    """
    runner = {"embedding": _embedding, "perplexity": _perplexity, "classification": _classification,
              "logits": _logits}[config.task]
    return runner(models, preprocessor, data, config, progress, memo)


def _config_dir(model: Path, reference, config_dir) -> Path:
    if config_dir is not None:
        return config_folder(config_dir)
    if model.is_dir():
        return config_folder(model)
    if not model.exists():
        raise VloraError(f"{model}: no such file or folder")
    beside = model.parent / "config.json"
    if beside.is_file():
        return model.parent
    if reference is not None and Path(reference).is_dir():
        return config_folder(reference)
    with open_checkpoint(model):  # a damaged file is the better message
        pass
    raise VloraError(f"{model}: no config.json beside it; name the original model folder with `config_dir`")


def _texts(preprocessor, data, what: str):
    if not takes_text(preprocessor):
        raise VloraError(f"{data}: {what} is for text models; this model takes images")


def _forward_all(models, preprocessor, samples, config, progress, fn, memo: dict | None = None):
    """Run every model over the same batches; ``fn(outputs, mask)`` -> a per-batch result.

    ``memo`` (the caller's, for one data set and config) keeps each model's results by identity, so
    a reference scored beside several models runs once (the report's alternatives)."""
    memo = {} if memo is None else memo
    todo = []
    for m in models:
        if id(m) not in memo:
            memo[id(m)] = []
            todo.append(m)
    n_batches = math.ceil(len(samples) / config.batch_size)
    with torch.no_grad(), Progress("evaluating", n_batches * len(todo), enabled=progress) as bar:
        limit = token_limit(models[0], config.max_length)
        for inputs, mask, _ in batches(preprocessor, samples, config.batch_size, limit) if todo else ():
            for m in todo:
                dev = model_device(m)
                result = fn(m(**{k: v.to(dev) for k, v in inputs.items()}), None if mask is None else mask.to(dev))
                memo[id(m)].append(result.cpu())
                bar.advance()
    return [memo[id(m)] for m in models]


def _embedding(models, preprocessor, data, config, progress, memo=None):
    _texts(preprocessor, data, "embedding")
    pairs = read_pairs(data)
    if pairs is not None:
        pairs = pairs[: config.samples] if config.samples else pairs
        texts = [t for a, b, _ in pairs for t in (a, b)]
    else:
        texts = read_texts(data, config.samples)
    embs = [torch.cat(e) for e in _forward_all(models, preprocessor, texts, config, progress, pooled_embedding, memo)]
    metrics = []
    if len(models) > 1:
        metrics.append(Metric("cosine_to_reference", float((embs[0] * embs[1]).sum(-1).mean()), 1.0))
    if pairs is not None:
        from scipy.stats import spearmanr

        gold = [s for _, _, s in pairs]
        rho = [float(spearmanr((e[0::2] * e[1::2]).sum(-1).numpy(), gold).statistic) for e in embs]
        metrics.append(Metric("spearman", rho[0], rho[1] if len(rho) > 1 else None))
    if not metrics:
        raise VloraError(f"{data}: embedding needs `reference`, or sentence pairs with gold scores")
    return len(pairs) if pairs is not None else len(texts), metrics


def _perplexity(models, preprocessor, data, config, progress, memo=None):
    _texts(preprocessor, data, "perplexity")
    ids = preprocessor(read_corpus(data), return_tensors="pt")["input_ids"][0]
    if config.samples:
        ids = ids[: config.samples * config.max_length]
    window = token_limit(models[0], config.max_length)
    stride = max(1, window // 2)
    if len(ids) < 2:
        raise VloraError(f"{data}: too little text for perplexity")
    ppl = []
    memo = {} if memo is None else memo
    with torch.no_grad(), Progress("perplexity", len(models), enabled=progress) as bar:
        for m in models:
            if id(m) in memo:
                ppl.append(memo[id(m)])
                continue
            nll, count, prev_end = 0.0, 0, 0
            for begin in range(0, len(ids) - 1, stride):
                end = min(begin + window, len(ids))
                target = end - prev_end  # score only tokens not scored by the last window
                chunk = ids[begin:end][None]
                labels = chunk.clone()
                labels[:, : chunk.shape[1] - target] = -100
                logits = m(input_ids=chunk.to(model_device(m))).logits[:, :-1].float().cpu()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         labels[:, 1:].reshape(-1), reduction="sum",
                                                         ignore_index=-100)
                n = int((labels[:, 1:] != -100).sum())
                nll, count, prev_end = nll + float(loss), count + n, end
                if end == len(ids):
                    break
            ppl.append(math.exp(nll / count))
            memo[id(m)] = ppl[-1]
            bar.advance()
    return int(len(ids)), [Metric("perplexity", ppl[0], ppl[1] if len(ppl) > 1 else None, higher_is_better=False)]


def _classification(models, preprocessor, data, config, progress, memo=None):
    rows = read_labelled(data)
    rows = rows[: config.samples] if config.samples else rows
    if takes_text(preprocessor) != isinstance(rows[0][0], str):
        kind = "text" if takes_text(preprocessor) else "images"
        raise VloraError(f"{data}: does not hold the {kind} this model takes")
    label2id = {str(k): int(v) for k, v in (models[0].config.label2id or {}).items()}
    labels = []
    for _, label in rows:
        if label in label2id:
            labels.append(label2id[label])
        elif label.lstrip("-").isdigit() and int(label) in models[0].config.id2label:
            labels.append(int(label))
        else:
            raise VloraError(f"{data}: label {label!r} is not one of the model's labels {sorted(label2id)}")
    preds = [torch.cat(p) for p in _forward_all(models, preprocessor, [s for s, _ in rows], config, progress,
                                                lambda o, m: o.logits.argmax(-1), memo)]
    gold = torch.tensor(labels)
    acc = [float((p == gold).float().mean()) for p in preds]
    metrics = [Metric("accuracy", acc[0], acc[1] if len(acc) > 1 else None)]
    if len(preds) > 1:
        metrics.append(Metric("agreement_with_reference", float((preds[0] == preds[1]).float().mean()), 1.0))
    return len(rows), metrics


def _logits(models, preprocessor, data, config, progress, memo=None):
    samples = read_texts(data, config.samples) if takes_text(preprocessor) else None
    if samples is None:
        from ..io.data import read_images

        samples = read_images(data, config.samples)

    def per_position(outputs, mask):
        logits = outputs.logits.float()
        if logits.dim() == 3:  # token logits: keep real tokens only
            return logits[mask] if mask is not None else logits.reshape(-1, logits.shape[-1])
        return logits

    if not hasattr(models[0], "config") or head_of(models[0].config) == "base":
        raise VloraError("`eval.task` logits needs a model with a head (a causal LM or a classifier)")
    out = [torch.cat(x) for x in _forward_all(models, preprocessor, samples, config, progress, per_position, memo)]
    logp, logq = torch.log_softmax(out[1], -1), torch.log_softmax(out[0], -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    top1 = float((out[0].argmax(-1) == out[1].argmax(-1)).float().mean())
    return len(samples), [Metric("kl_to_reference", kl, 0.0, higher_is_better=False),
                          Metric("top1_agreement", top1, 1.0)]
