"""Heal a VLoRA file by distillation from the original model, keeping the VLoRA structure.

The trainable tensors are exactly what the file stores: bases and increment factors (and the
dense 1-D parameters of the stack). Each step rebuilds the factorised weights from them with the
same rule expand uses, so gradients reach the shared bases through every layer that uses them, and
the healed file has the same plan, layout and size as before.

This first version trains on the CPU (or any torch device) in one process with a pooled-embedding
cosine loss; it rebuilds every factorised weight each step, which suits small models.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import DTYPES
from .data import read_texts
from .errors import VloraError
from .evaluate import pooled_embedding
from .factorise import rebuild_family
from .fileformat import VloraFile, factorised_keys, family_layout, header_metadata, layout
from .models import batches, load_model, load_preprocessor, module_for_key, param_for_key, takes_text, token_limit
from .progress import Progress
from .write import SafetensorsWriter, check_output

TRAINABLE = ("increments", "bases", "dense")


@dataclass(frozen=True)
class HealConfig:
    steps: int = 150
    lr: float = 3e-4
    batch_size: int = 32
    max_length: int = 128
    warmup: int = 10  # steps of linear warm-up before the cosine decay
    clip: float = 1.0  # gradient-norm clipping
    train: tuple[str, ...] = TRAINABLE  # what trains: increments, bases, dense (1-D stack parameters)
    minutes: float | None = None  # stop early when this much wall time has passed
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise VloraError("--steps and --batch-size must be at least 1 and --lr positive")
        unknown = set(self.train) - set(TRAINABLE)
        if unknown or not self.train:
            raise VloraError(f"--train takes some of {', '.join(TRAINABLE)}, not {sorted(unknown) or 'nothing'}")
        if self.device != "cpu" and not (self.device.startswith("cuda") and torch.cuda.is_available()):
            raise VloraError(f"device {self.device!r} is not available here")


@dataclass(frozen=True)
class HealReport:
    source: str
    output: str
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per logged stretch of steps
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def heal(vlora_path: str | Path, teacher: str | Path, data: str | Path, out: str | Path,
         config: HealConfig = HealConfig(), force: bool = False, progress: bool = False) -> HealReport:
    """Distil ``teacher`` (the original model folder) into the VLoRA file's structure; write ``out``."""
    started = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    vfile = VloraFile(vlora_path)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    tok = load_preprocessor(teacher)
    if not takes_text(tok):
        raise VloraError(f"{teacher}: healing supports text models so far")
    texts = read_texts(data)
    teacher_model = load_model(teacher, head="base").to(device)
    student = load_model(vfile.path, teacher, head="base").to(device)
    _check_match(vfile, teacher_model)

    stored = {name: torch.nn.Parameter(vfile.get(name).float().to(device), requires_grad=_trains(name, config))
              for fp in vfile.plan.families for name, _, _ in family_layout(fp)}
    targets = _targets(student, vfile)  # family key -> parameter name in the student
    for p in student.parameters():
        p.requires_grad_(False)
    dense = _stack_dense(student, vfile) if "dense" in config.train else {}
    for p in dense.values():
        p.requires_grad_(True)
    params = [p for p in stored.values() if p.requires_grad] + list(dense.values())
    if not params:
        raise VloraError("nothing to train: every stored tensor is frozen")
    opt = torch.optim.AdamW(params, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, config))

    limit = token_limit(student, config.max_length)
    batch_list = list(batches(tok, texts, config.batch_size, limit))
    with torch.no_grad():
        goals = [pooled_embedding(teacher_model(**_to(inputs, device)), mask.to(device)) for inputs, mask, _ in batch_list]
    del teacher_model
    losses, window = [], []
    student.train()
    with Progress("healing", config.steps, enabled=progress) as bar:
        for step in range(config.steps):
            if config.minutes is not None and time.perf_counter() - started > 60 * config.minutes:
                break
            inputs, mask, _ = batch_list[step % len(batch_list)]
            weights = _rebuild(vfile, stored, targets)
            outputs = torch.func.functional_call(student, weights, args=(), kwargs=_to(inputs, device))
            emb = pooled_embedding(outputs, mask.to(device))
            loss = 1 - (emb * goals[step % len(batch_list)]).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.clip)
            opt.step()
            sched.step()
            window.append(loss.detach().item())
            if len(window) == 10 or step == config.steps - 1:
                losses.append(sum(window) / len(window))
                window = []
            bar.advance()
    steps_done = step + 1 if config.steps else 0
    _write(vfile, stored, student, dense, out)
    return HealReport(str(vlora_path), str(out), steps_done, time.perf_counter() - started, losses,
                      {**asdict(config), "train": list(config.train)})


def _trains(name: str, config: HealConfig) -> bool:
    is_increment = name.endswith((".vlora_A", ".vlora_B"))
    return ("increments" if is_increment else "bases") in config.train


def _schedule(step: int, config: HealConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _targets(student, vfile: VloraFile) -> dict[str, str]:
    out = {}
    for fp in vfile.plan.families:
        for layer in fp.layers:
            key = fp.key(layer)
            found = module_for_key(student, key)
            if found is None:
                raise VloraError(f"{vfile.path}: {key} has no module in the model")
            out[key] = found[0] + ".weight"
    return out


def _stack_dense(student, vfile: VloraFile) -> dict[str, torch.nn.Parameter]:
    """The 1-D parameters (biases, norms) of the stacks' layers, by checkpoint key."""
    factorised = factorised_keys(vfile.plan)
    prefixes = tuple(s.prefix + "." for s in vfile.plan.stacks)
    out = {}
    for key, _, shape in vfile.source.tensors:
        if key in factorised or len(shape) != 1 or not key.startswith(prefixes):
            continue
        param = param_for_key(student, key)
        if param is not None:
            out[key] = param
    return out


def _rebuild(vfile: VloraFile, stored, targets) -> dict[str, torch.Tensor]:
    weights = {}
    for fp in vfile.plan.families:
        for key, w in rebuild_family(fp, stored.__getitem__):
            weights[targets[key]] = w.float()
    return weights


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _check_match(vfile: VloraFile, teacher) -> None:
    for fp in vfile.plan.families:
        key = fp.key(fp.layers[0])
        found = module_for_key(teacher, key)
        if found is None or tuple(found[1].weight.shape) != fp.shape:
            raise VloraError(f"{vfile.path}: does not match the teacher: {key} is not a {list(fp.shape)} weight there")


def _write(vfile: VloraFile, stored, student, dense, out: Path) -> None:
    """The same plan and layout; trained tensors in the stored dtype, the rest as they were."""
    entries = layout(vfile.plan, vfile.source)
    meta = header_metadata(vfile.plan, vfile.source, vfile.config)
    with SafetensorsWriter(out, entries, meta) as writer, torch.no_grad():
        for name, dtype, _ in entries:
            if name in stored:
                t = stored[name].detach().cpu()
            elif name in dense:
                t = dense[name].detach().cpu()
            else:
                t = vfile.get(name)
            writer.write(name, t.to(DTYPES[dtype]).contiguous())
