"""Heal a VLoRA file by distillation from the original model, keeping the VLoRA structure.

The student is the file loaded factored (``factored.load_factored``): its trainable tensors are
exactly what the file stores (bases and increment factors, once each, plus the stack's 1-D
parameters), every layer's weight is formed inside that layer's forward, and the healed file has
the same plan, layout and size as before.

The loop is meant to be left alone: a budget in steps, tokens or minutes; a state file saved
atomically every few steps and on Ctrl-C or a crash, from which ``resume`` continues with the
same result as an uninterrupted run; an eval on held-out data every N steps (vlora-eval's code),
keeping the best; data parallel under ``torchrun`` (``python -m vlora_compress.heal``).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..io.checkpoint import DTYPES
from ..calibrate.grams import text_windows
from ..io.data import read_corpus, read_texts
from ..errors import Interrupted, VloraError
from ..evaluate.scoring import EvalConfig, default_task, evaluate_models
from ..runtime.factored import load_factored
from ..fit.factorise import encode
from ..heal.local import heal_locally
from ..io.fileformat import VloraFile, factorised_keys, header_metadata, layout
from ..plan import INCREMENT_SUFFIXES, family_matrices
from ..fit.integers import SCALE_SUFFIX
from ..io.models import config_folder, head_of, load_model, load_preprocessor, module_for_key, param_for_key
from ..io.models import batches, pooled_embedding, resolve_device, takes_text, token_limit
from ..progress import Progress
from ..io.write import SafetensorsWriter, atomic_output, check_output
from .config import LOSSES, PARALLEL, PRECISIONS, TRAINABLE, HealConfig  # noqa: F401 - re-exported; defined in heal/config.py

LOCAL_STEPS = 32  # block-local steps a layer for causal LMs (bench/heal.py --llm on SmolLM2)


def default_local_steps(head: str, minutes: float | None = None) -> int:
    """Block-local healing first for causal LMs, where end-to-end distillation in CPU-minutes made
    SmolLM2 worse; none for the rest, whose end-to-end recipe was measured on MiniLM. With a time
    budget, as many steps as its share of the minutes allows (more steps kept paying on SmolLM2)."""
    if head != "causal-lm":
        return 0
    return 10**9 if minutes else LOCAL_STEPS


def default_losses(head: str) -> tuple[tuple[str, float], ...]:
    """Per-layer hidden states for everyone, then what the model's output is for.

    Weights from bench/heal.py on MiniLM (hidden:3 + cosine recovered most per minute); models
    with a head take the same hidden weight, which has not been measured there.
    """
    return (("hidden", 3.0), ("cosine", 1.0)) if head == "base" else (("hidden", 3.0), ("kl", 1.0))


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
    local: dict | None = None  # block-local healing (localheal.LocalReport), when it ran
    memory: dict = field(default_factory=dict)  # bytes this process held at the end (_memory)
    precision: str = "fp32"  # what ran: bf16 or fp32 (config.precision resolved on the device)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _State:
    """Everything a resumed run needs to continue as if it had never stopped."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list = field(default_factory=list)
    window: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    best: dict | None = None  # {"step", "value", "tensors", "index": of its eval in evals}
    local: dict | None = None  # the block-local pass's LocalReport, once it has run


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".state")


HOLD_BACK = 10  # without eval data, one training sample in this many (the last ones) is held back


def heal(vlora_path: str | Path, teacher: str | Path, data: str | Path, out: str | Path,
         config: HealConfig = HealConfig(), force: bool = False, progress: bool = False,
         eval_data: str | Path | None = None, resume: bool = False, on_step=None) -> HealReport:
    """Distil ``teacher`` (the original model folder) into the VLoRA file's structure; write ``out``.

    The student is scored against the teacher before training and at the end (and every
    ``eval_every`` steps) on ``eval_data``, or without it on the last tenth of ``data``, held back
    from training; the best of those steps is written, the start included, so healing never makes
    a file worse by its own measure, and the report always has ``before`` and ``after``.
    ``on_step(step, loss)`` is called after every optimiser step (raising KeyboardInterrupt there
    behaves as Ctrl-C does).
    """
    texts = read_texts(data)
    if eval_data is not None or len(texts) < 2:
        held = f"{eval_data}" if eval_data is not None else None
        return _heal(vlora_path, teacher, texts, out, config, force, progress, eval_data, held, resume, on_step)
    n = max(1, len(texts) // HOLD_BACK)
    with tempfile.TemporaryDirectory() as tmp:
        held_file = Path(tmp) / "held-back.txt"
        held_file.write_text("\n".join(texts[-n:]) + "\n", encoding="utf-8")
        return _heal(vlora_path, teacher, texts[:-n], out, config, force, progress, held_file,
                     f"the last {n} of the {len(texts)} samples of {data}, held back from training", resume, on_step)


def _heal(vlora_path, teacher, texts: list[str], out, config: HealConfig, force: bool, progress: bool,
          eval_data, eval_name: str | None, resume: bool, on_step) -> HealReport:
    """Heals in the process group that torchrun describes, joined here and left at the end where
    this call joined it: gloo's threads outliving the group at interpreter exit can crash a process
    that has finished its work."""
    joined = _join_group(config.device)
    try:
        return _heal_in_group(vlora_path, teacher, texts, out, config, force, progress, eval_data, eval_name,
                              resume, on_step)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _heal_in_group(vlora_path, teacher, texts: list[str], out, config: HealConfig, force: bool, progress: bool,
                   eval_data, eval_name: str | None, resume: bool, on_step) -> HealReport:
    started = time.perf_counter()
    out = Path(out)
    rank, world = _distributed()
    if rank == 0:
        check_output(out, force)
    vfile = VloraFile(vlora_path)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    teacher = config_folder(teacher)
    tok = load_preprocessor(teacher)
    if not takes_text(tok):
        raise VloraError(f"{teacher}: healing supports text models so far")
    low = config.low_precision(device)
    # the teacher only ever runs forward: in bfloat16 it costs half the memory (a 7B model: 14 GB)
    teacher_model = load_model(teacher, dtype=torch.bfloat16 if low else torch.float32).to(device)
    teacher_model.requires_grad_(False)
    _check_match(vfile, teacher_model)
    head = head_of(teacher_model.config)
    losses = dict(config.losses or default_losses(head))
    if "kl" in losses and head == "base":
        raise VloraError(f"{teacher}: `heal.losses` kl needs a model with a head; this one gives hidden states only")
    if config.batch_size % world:
        raise VloraError(f"`heal.batch_size` {config.batch_size} does not split evenly over {world} processes")
    fsdp = world > 1 and config.parallel == "fsdp"

    student = load_factored(vfile.path, teacher, head).to(device)
    # integer-stored tensors train through a straight-through quantizer: the loss is the file's
    student.vlora_store.quantization_aware = config.quantization_aware
    trainable = _trainable(student, vfile, config)
    # float32 master weights for what trains, whatever the file stores; the frozen rest in bfloat16
    # when autocast does the maths in it anyway (fully_shard wants one dtype: it gathers in bf16)
    held = torch.bfloat16 if low and not fsdp else torch.float32
    for p in student.parameters():  # parameters only: buffers (rotary frequencies) keep their dtype
        p.data = p.data.float() if p.requires_grad else p.data.to(held)
    opt = _optimizer(student, trainable, config)
    _train_mode(student, config.checkpointing)

    limit = token_limit(student, config.max_length)
    batch_list = _length_batches(tok, texts, config.batch_size, limit)
    state, resumed_from, saved = _State(), None, None
    if resume:  # the trained tensors now, into whole replicas; the optimizer's once it is final
        saved = _read_state(state_path(out), vfile, config)
        state = _restore(saved, trainable)
        resumed_from = state.step
    # sharded models run forward only all together, so under fsdp every process scores (the same)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)
    evaluator = (_Evaluator(eval_data, teacher, student, teacher_model, config, autocast)
                 if eval_data and (rank == 0 or fsdp) else None)
    if evaluator and not state.evals:
        state.evals.append({"step": 0, "value": evaluator()})
        state.best = {"step": 0, "value": state.evals[-1]["value"], "tensors": None, "index": 0}

    cache: dict[int, dict] = {}  # batch index -> the teacher's targets, at most cache_bytes of them
    cached = 0
    clock = time.perf_counter() - state.seconds  # earlier runs' time counts against --minutes
    local_steps = config.local_steps if config.local_steps is not None else default_local_steps(head, config.minutes)
    ran_local = bool(local_steps) and state.local is None
    if ran_local:
        # on whole replicas, before any sharding: one layer trains at a time, its gradients summed
        state.local = _heal_locally(student, teacher_model, vfile, tok, texts, eval_data, config, local_steps,
                                    head, limit, rank, world, progress, autocast)
        if evaluator:
            _track(state, evaluator, trainable, phase="layer by layer", keep=rank == 0)
    local_seconds = state.local["seconds"] if state.local else 0.0
    model = student
    if fsdp:
        _fully_shard(student, teacher_model, vfile.plan, low)
        trainable = _trainable(student, vfile, config)  # fully_shard swapped in sharded parameters
        opt = _optimizer(student, trainable, config)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if saved is not None:
        _restore_optimizer(saved, student, opt)
    del saved

    def save() -> None:  # every process calls it (a sharded run gathers); rank 0 writes
        state.seconds = time.perf_counter() - clock
        _save_state(state_path(out), state, vfile, config, trainable, opt, rank, student, fsdp)

    if ran_local:
        save()
    seen_here, start_step, run_started = 0, state.step, time.perf_counter()
    try:
        with Progress("healing", config.steps, enabled=progress and rank == 0) as bar, _StopSignals() as stop:
            bar.advance(state.step)
            while True:
                # one clock and one stop for all processes, or they would leave the loop at different steps
                stopping, elapsed = stop.agree(world, device, time.perf_counter() - clock)
                if _spent(state, config, elapsed):
                    break
                if stopping:  # SIGINT or SIGTERM (a cluster's time limit) on any process
                    save()
                    raise Interrupted(f"stopped at step {state.step} by a signal; state saved to {state_path(out)}: "
                                      "run the same command with `resume` to continue")
                index = _batch_index(state.step, len(batch_list), config.seed)
                inputs, mask = batch_list[index]
                n_tokens = int(mask.sum())
                rows = _shard(inputs, mask, rank, world)
                goal = cache.get(index)
                if goal is None:
                    with torch.no_grad(), autocast:
                        goal = _teacher_targets(teacher_model, rows, losses, device)
                    size = _nbytes(goal)
                    keep = config.cache_teacher and cached + size <= config.cache_bytes
                    if fsdp:  # every process must rerun the (sharded) teacher for a batch, or none
                        keep = _everywhere(keep, device)
                    if keep:
                        cache[index], cached = _moved(goal, "cpu"), cached + size  # host memory, bounded
                else:
                    goal = _moved(goal, device)
                _set_lr(opt, state, config, elapsed, local_seconds)
                with autocast:
                    loss = _loss(model, rows, goal, losses, config.temperature, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.clip)
                opt.step()
                value = _global_mean(loss.detach(), world)
                state.step += 1
                state.tokens += n_tokens
                seen_here += n_tokens
                state.window.append(value)
                if len(state.window) == 10:
                    state.losses.append(sum(state.window) / 10)
                    state.window = []
                rate = seen_here / max(1e-9, time.perf_counter() - run_started)
                bar.describe(f"healing · loss {value:.4f} · {rate:,.0f} tok/s")
                bar.advance()
                if evaluator and config.eval_every and state.step % config.eval_every == 0:
                    _track(state, evaluator, trainable, keep=rank == 0)
                if on_step is not None:
                    on_step(state.step, value)
                if state.step % config.save_every == 0:
                    save()
    except Interrupted:
        raise
    except BaseException as e:
        # a sharded run cannot gather from processes that are elsewhere: its last save stands
        if not fsdp and state.step > start_step:
            save()
        if isinstance(e, KeyboardInterrupt):
            saved_at = "" if fsdp else f"; state saved to {state_path(out)}: run the same command with `resume` to continue"
            raise Interrupted(f"interrupted at step {state.step}{saved_at}") from None
        raise
    if state.window:
        state.losses.append(sum(state.window) / len(state.window))
        state.window = []
    if evaluator and (not state.evals or state.evals[-1]["step"] != state.step):
        _track(state, evaluator, trainable, keep=rank == 0)
    final = _gather(trainable, keep=rank == 0, copy=False)  # rank 0 writes
    best = state.best
    if best is not None and best["index"] != len(state.evals) - 1:  # an earlier eval was best
        final = best["tensors"] if best["tensors"] is not None else {}  # None: the start, the file as it was
    if rank == 0:
        _write(vfile, final, out)
        state_path(out).unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return HealReport(
        str(vlora_path), str(out), state.step, state.tokens, seconds, str(device), world, state.losses,
        state.evals, evaluator.name if evaluator else None, evaluator.higher_is_better if evaluator else None,
        state.evals[0]["value"] if state.evals else None, best["value"] if best else None,
        best["step"] if best else None, resumed_from, eval_name, cached, state.local,
        _memory(student, teacher_model, trainable, opt, cached), "bf16" if low else "fp32",
        {**asdict(config), "train": list(config.train), "losses": [list(x) for x in losses.items()]},
    )


def _heal_locally(student, teacher_model, vfile: VloraFile, tok, texts: list[str], eval_data, config: HealConfig,
                  steps: int, head: str, limit: int, rank: int, world: int, progress: bool, autocast) -> dict:
    """Block-local healing (heal/local.py) on the first ``local_samples`` of the training data
    (windows of running text for a causal LM, as it was calibrated), each layer's training kept
    only where it lowers the layer's error on the eval data (or the slice held back)."""
    causal = head == "causal-lm"
    train = text_windows(tok, "\n".join(texts), limit, config.local_samples) if causal else texts[:config.local_samples]
    held = []
    if eval_data is not None:
        held = (text_windows(tok, read_corpus(eval_data), limit, config.eval_samples) if causal
                else read_texts(eval_data, config.eval_samples))

    def sharded(samples):
        if config.local_batch_size % world:
            raise VloraError(f"`heal.local_batch_size` {config.local_batch_size} does not split evenly over {world} processes")
        return [(*_shard(inputs, mask, rank, world), n)
                for inputs, mask, n in batches(tok, samples, config.local_batch_size, limit)]

    reduce = None
    if world > 1:
        import torch.distributed as dist

        reduce = dist.all_reduce
    seconds = 60 * config.minutes * config.local_share if config.minutes else None
    report = heal_locally(student, teacher_model, vfile.plan, sharded(train), sharded(held),
                          replace(config, local_steps=steps), seconds, autocast, progress and rank == 0, reduce)
    return report.to_dict()


def _join_group(device_name: str) -> bool:
    """Joins the process group that torchrun describes in the environment, unless one process or
    already joined; whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    device = resolve_device(device_name)
    if device.type == "cuda":  # this process's GPU, before anything (NCCL, fully_shard's mesh) picks cuda:0
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _distributed() -> tuple[int, int]:
    """(rank, world size) in the process group joined, or (0, 1) in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _optimizer(student, trainable: dict, config: HealConfig) -> torch.optim.Optimizer:
    """AdamW over bases and factors at ``lr``, the stack's 1-D parameters at ``lr_dense``."""
    stored = set(student.vlora_store.names)
    groups = [{"params": [p for n, p in trainable.items() if n in stored], "lr": config.lr},
              {"params": [p for n, p in trainable.items() if n not in stored], "lr": config.lr_dense or config.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def _fully_shard(student, teacher, plan, low: bool) -> None:
    """Shard student and teacher with torch's ``fully_shard``, each stack layer a unit and the rest
    (embeddings, head and, for the student, the store of bases and factors, which layers of a chunk
    share) the root. A process keeps 1/world of every parameter, gradient and optimizer state, and
    gathers a layer for its turn; in low precision the student's float32 masters gather as bf16."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..pipelines.sequential import stack_layers

    mesh = init_device_mesh(next(student.parameters()).device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if low else None, reduce_dtype=torch.float32)
    for model, mp in ((teacher, MixedPrecisionPolicy()), (student, policy)):
        blocks = {}
        for stack in plan.stacks:
            families = [fp for fp in plan.families if fp.stack == stack.prefix]
            if families:
                blocks.update({id(b): b for b in stack_layers(model, families).values()})
        for block in blocks.values():
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)


def _gather(trainable: dict, keep: bool, copy: bool = True) -> dict[str, torch.Tensor]:
    """Name -> the whole tensor on the host, one at a time: when sharded a gather in which every
    process takes part, though only where ``keep`` is the result held ({} elsewhere). ``copy``:
    a copy even where the tensor is already whole on the host (a snapshot that training won't move)."""
    out = {}
    for n, p in trainable.items():
        whole = _full(p)
        if keep:
            out[n] = whole.cpu().clone() if copy else whole.cpu()
    return out


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, gathered from every process when it is sharded."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor().detach() if isinstance(p, DTensor) else p.detach()


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def _memory(student, teacher, trainable: dict, opt, cache: int) -> dict:
    """Bytes this process holds: the teacher's and student's parameters (their shards when
    sharded), of which what trains, its gradients' room and the optimizer's state, the teacher cache."""
    return {
        "teacher": _local_bytes(teacher.parameters()),
        "student": _local_bytes(student.parameters()),
        "trained": _local_bytes(trainable.values()),
        "optimizer": _local_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()),
        "teacher_cache": cache,
    }


def _everywhere(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def _trainable(student, vfile: VloraFile, config: HealConfig) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for what trains; everything else is frozen."""
    for p in student.parameters():
        p.requires_grad_(False)
    out = {}
    for name, p in student.vlora_store.items():
        is_increment = name.endswith(INCREMENT_SUFFIXES)
        if ("increments" if is_increment else "bases") in config.train:
            out[name] = p
    if "dense" in config.train:
        out.update(_stack_dense(student, vfile))
    if not out:
        raise VloraError("nothing to train: every stored tensor is frozen")
    for p in out.values():
        p.requires_grad_(True)
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


def _train_mode(student, checkpointing: bool) -> None:
    """Dropout off (the student chases the teacher's deterministic outputs); train mode only where
    transformers needs it for gradient checkpointing."""
    if not checkpointing:
        student.eval()
        return
    # a chain's partial sums would hold every layer's dense weight until backward (runtime/factored.py)
    student.vlora_store.partial_sums = False
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise VloraError(f"{type(student).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):  # the name since transformers 5.x
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    student.train()
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _length_batches(tok, texts: list[str], batch_size: int, limit: int) -> list[tuple[dict, torch.Tensor]]:
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


def _batch_index(step: int, n: int, seed: int) -> int:
    """A fresh shuffle of the batches each epoch, from the step number alone (so resume agrees)."""
    epoch, pos = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[pos])


def _shard(inputs: dict, mask: torch.Tensor, rank: int, world: int) -> tuple[dict, torch.Tensor]:
    if world == 1:
        return inputs, mask
    return {k: v.chunk(world)[rank] for k, v in inputs.items()}, mask.chunk(world)[rank]


def _spent(state: _State, config: HealConfig, elapsed: float) -> bool:
    return (state.step >= config.steps or (config.tokens is not None and state.tokens >= config.tokens)
            or (config.minutes is not None and elapsed >= 60 * config.minutes))


def _set_lr(opt, state: _State, config: HealConfig, elapsed: float, local_seconds: float = 0.0) -> None:
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


def _teacher_targets(teacher, rows, losses: dict, device) -> dict:
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


def _loss(model, rows, goal: dict, losses: dict, temperature: float, device) -> torch.Tensor:
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


def _global_mean(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


class _Evaluator:
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


def _track(state: _State, evaluator: _Evaluator, trainable, phase: str | None = None, keep: bool = True) -> None:
    """Score now; a new best keeps its tensors (gathered from every process when sharded; kept
    only where ``keep``: rank 0, which writes)."""
    value = evaluator()
    state.evals.append({"step": state.step, "value": value, **({"phase": phase} if phase else {})})
    if state.best is None or evaluator.better(value, state.best["value"]):
        tensors = _gather(trainable, keep)
        state.best = {"step": state.step, "value": value, "tensors": tensors, "index": len(state.evals) - 1}


STATE_VERSION = 2  # 2: the optimizer's state keyed by parameter name


def _save_state(path: Path, state: _State, vfile: VloraFile, config: HealConfig, trainable, opt,
                rank: int, student, sharded: bool) -> None:
    """The resumable state, written atomically by rank 0. When ``sharded`` (fully_shard) every
    process must call it: the tensors and the optimizer's state are gathered whole. Either way the
    optimizer's state is torch's full state dict, keyed by parameter name, so a state resumes on
    one process, under ddp or under fsdp, on any number of processes."""
    if not sharded and rank != 0:
        return
    tensors = _gather(trainable, keep=rank == 0, copy=False)
    optimizer = {}
    if opt.state:  # asking torch for a fresh optimizer's state would initialise it with a zero step
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = get_optimizer_state_dict(student, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=sharded))
    if rank != 0:
        return
    blob = {
        "vlora_state": STATE_VERSION,
        "source": _identity(vfile),
        "config": {k: v for k, v in asdict(config).items() if k not in config.budget_fields()},
        "state": {**asdict(state), "best": state.best},
        "trainable": tensors,
        "optimizer": optimizer,
        "rng": torch.get_rng_state(),
    }
    with atomic_output(path) as tmp:
        torch.save(blob, tmp)


def _read_state(path: Path, vfile: VloraFile, config: HealConfig) -> dict:
    if not path.is_file():
        raise VloraError(f"{path}: no saved state to resume from")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        version = blob.get("vlora_state")
    except Exception as e:  # noqa: BLE001 - any unreadable state is the same user problem
        raise VloraError(f"{path}: not a readable healing state ({type(e).__name__})") from None
    if version != STATE_VERSION:
        raise VloraError(f"{path}: not a healing state" if version is None else
                         f"{path}: saved by another version of vlora-compress; heal again without `resume`")
    if blob["source"] != _identity(vfile):
        raise VloraError(f"{path}: was saved while healing another file than {vfile.path}")
    now = {k: v for k, v in asdict(config).items() if k not in config.budget_fields()}
    if blob["config"] != now:
        changed = sorted(k for k in now if blob["config"].get(k) != now[k])
        raise VloraError(f"{path}: was saved with other settings ({', '.join(changed)}); resume with the same ones")
    return blob


def _restore(blob: dict, trainable) -> _State:
    """The saved tensors into the (whole, not yet sharded) trainable parameters, and the RNG."""
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(blob["trainable"][n])
    torch.set_rng_state(blob["rng"])
    return _State(**blob["state"])


def _restore_optimizer(blob: dict, student, opt) -> None:
    """The saved whole optimizer state into ``opt`` (each process takes its shard when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if blob["optimizer"]:  # saved before the first end-to-end step: nothing to load
        set_optimizer_state_dict(student, opt, blob["optimizer"], options=StateDictOptions(full_state_dict=True))


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the step it is in, save its state and exit (a
    cluster's time limit sends SIGTERM, often twice: to every process and through torchrun); a
    second Ctrl-C stops at once (a second: torchrun passes the terminal's on at once). All processes
    stop at the same step: they agree before each."""

    def __init__(self):
        self.flag, self.first, self.previous = False, None, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        return False

    def _handle(self, signum, frame):
        import signal

        now = time.monotonic()
        if signum == signal.SIGINT and self.first is not None and now - self.first > 2.0:
            raise KeyboardInterrupt
        self.flag, self.first = True, self.first if self.first is not None else now

    def agree(self, world: int, device: torch.device, elapsed: float) -> tuple[bool, float]:
        """(whether any process was asked to stop, the longest elapsed time of any process)."""
        if world == 1:
            return self.flag, elapsed
        import torch.distributed as dist

        t = torch.tensor([float(self.flag), elapsed], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0]), float(t[1])


def _identity(vfile: VloraFile) -> dict:
    st = vfile.path.stat()
    return {"name": vfile.path.name, "bytes": st.st_size, "sha256": vfile.source.sha256}


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _moved(goal: dict, device) -> dict:
    """The teacher's targets (tensors, or lists of them per layer) on ``device``."""
    return {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in goal.items()}


def _nbytes(goal: dict) -> int:
    return sum(t.numel() * t.element_size() for v in goal.values() for t in (v if isinstance(v, list) else [v]))


def _check_match(vfile: VloraFile, teacher) -> None:
    for fp in vfile.plan.families:
        key = fp.key(fp.layers[0])
        found = module_for_key(teacher, key)
        w = getattr(found[1], "weight", None) if found else None
        if w is None or tuple(w.shape) != fp.shape:
            raise VloraError(f"{vfile.path}: does not match the teacher: {key} is not a {list(fp.shape)} weight there")


def _write(vfile: VloraFile, trained: dict[str, torch.Tensor], out: Path) -> None:
    """The same plan and layout; trained tensors in the stored dtype (quantized where the file is:
    with quantization-aware training, the values the forward trained against), the rest byte for byte."""
    entries = layout(vfile.plan, vfile.source)
    meta = header_metadata(vfile.plan, vfile.source, vfile.config)
    encoded = {}
    for fp in vfile.plan.families:
        for name, _ in family_matrices(fp):
            if name in trained:  # at the file's own scales, which quantization-aware training kept
                scale = vfile.checkpoint.read(name + SCALE_SUFFIX) if fp.quant_of(name) != "none" else None
                encoded.update(encode(fp, name, trained[name].detach().cpu().float(), scale=scale)[0])
    with SafetensorsWriter(out, entries, meta) as writer, torch.no_grad():
        for name, dtype, _ in entries:
            if name in encoded:
                t = encoded[name]
            elif name in trained:
                t = trained[name].detach().cpu()
            else:
                t = vfile.checkpoint.read(name)
            writer.write(name, t.to(DTYPES[dtype]).contiguous())
