"""Heal a VLoRA file by distillation from the original model, keeping the VLoRA structure.

The student is the file loaded factored (``factored.load_factored``): its trainable tensors are
exactly what the file stores (bases and increment factors, once each, plus the stack's 1-D
parameters), every layer's weight is formed inside that layer's forward, and the healed file has
the same plan, layout and size as before.

The loop is meant to be left alone: a budget in steps, tokens or minutes; a state file saved
atomically every few steps and on Ctrl-C or a crash, from which ``resume`` continues with the
same result as an uninterrupted run; an eval on held-out data every N steps (vlora-eval's code),
keeping the best; data parallel under ``torchrun`` (``python -m vlora_compress.heal``).

This module is the run's outline: ``heal`` first, then its set-up, steps and end. The parts are
beside it: ``student`` (what trains, the optimiser), ``schedule`` (batches, learning rate,
budget), ``losses`` (teacher targets, losses, the teacher cache), ``evals`` (scores, the best
step), ``state`` (resume), ``stop`` (signals), ``parallel`` (ddp, fsdp), ``local`` (layer by
layer), ``write`` (the healed file), ``report`` (HealReport), ``config`` (HealConfig).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..calibrate.grams import text_windows
from ..errors import Interrupted, VloraError
from ..io.data import read_corpus, read_texts
from ..io.fileformat import VloraFile
from ..io.models import batches, config_folder, head_of, load_model, load_preprocessor, resolve_device, takes_text
from ..io.models import token_limit
from ..io.write import check_output
from ..progress import Progress
from ..runtime.factored import load_factored
from .config import LOSSES, PARALLEL, PRECISIONS, TRAINABLE, HealConfig
from .evals import Evaluator, track
from .local import heal_locally
from .losses import TeacherCache, default_losses, student_loss
from .parallel import distributed, fully_shard_models, gather, global_mean, join_group, shard
from .report import HealReport, memory
from .schedule import batch_index, length_batches, set_lr, spent
from .state import State, read_state, restore, restore_optimizer, save_state, state_path
from .stop import StopSignals
from .student import frozen_integers, optimizer, train_mode, trainable_parameters
from .write import check_match, write_healed

# the public API; HealConfig and its choices are defined in heal/config.py, re-exported here
__all__ = ["heal", "HealConfig", "HealReport", "state_path", "default_local_steps", "default_losses",
           "LOSSES", "PARALLEL", "PRECISIONS", "TRAINABLE"]

HOLD_BACK = 10  # without eval data, one training sample in this many (the last ones) is held back
LOCAL_STEPS = 32  # block-local steps a layer for causal LMs (bench/heal.py --llm on SmolLM2)


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
    joined = join_group(config.device)
    try:
        return _heal_in_group(vlora_path, teacher, texts, out, config, force, progress, eval_data, eval_name,
                              resume, on_step)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _heal_in_group(vlora_path, teacher, texts: list[str], out, config: HealConfig, force: bool, progress: bool,
                   eval_data, eval_name: str | None, resume: bool, on_step) -> HealReport:
    """The run in order: teacher, student, first scores and block-local healing, sharding, the
    end-to-end steps, and the end (the best step written, the report)."""
    started = time.perf_counter()
    run = _load_teacher(vlora_path, teacher, out, config, force)
    saved = _load_student(run, texts, resume)
    ran_local = _score_and_heal_locally(run, texts, eval_data, progress)
    _distribute(run, saved)
    del saved
    if ran_local:
        run.save()
    _steps(run, progress, on_step)
    return _finish(run, vlora_path, eval_name, started)


@dataclass
class _Run:
    """What one healing run holds from its set-up through its steps to its end."""

    config: HealConfig
    out: Path
    rank: int
    world: int
    vfile: VloraFile
    device: torch.device
    teacher: Path  # the original model's folder
    tok: Any
    low: bool  # the maths in bfloat16 (config.precision resolved on the device)
    teacher_model: torch.nn.Module
    head: str
    losses: dict  # loss -> weight
    fsdp: bool
    student: Any = None
    model: Any = None  # what trains forward: the student, or DistributedDataParallel around it
    trainable: dict | None = None  # name -> parameter
    opt: torch.optim.Optimizer | None = None
    limit: int = 0  # tokens a sample
    batch_list: list | None = None
    state: State | None = None
    resumed_from: int | None = None
    autocast: Any = None
    evaluator: Evaluator | None = None
    cache: TeacherCache | None = None
    clock: float = 0.0  # time.perf_counter() at the start, earlier runs' time included (--minutes)
    local_seconds: float = 0.0  # block-local healing's share of the time

    def save(self) -> None:
        """The resumable state: every process calls it (a sharded run gathers); rank 0 writes."""
        self.state.seconds = time.perf_counter() - self.clock
        save_state(state_path(self.out), self.state, self.vfile, self.config, self.trainable, self.opt, self.rank,
                   self.student, self.fsdp)


def _load_teacher(vlora_path, teacher, out, config: HealConfig, force: bool) -> _Run:
    """The file, the device and the original model (forward only), checked against each other, and
    the losses for the model's head."""
    out = Path(out)
    rank, world = distributed()
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
    check_match(vfile, teacher_model)
    head = head_of(teacher_model.config)
    losses = dict(config.losses or default_losses(head))
    if "kl" in losses and head == "base":
        raise VloraError(f"{teacher}: `heal.losses` kl needs a model with a head; this one gives hidden states only")
    if config.batch_size % world:
        raise VloraError(f"`heal.batch_size` {config.batch_size} does not split evenly over {world} processes")
    fsdp = world > 1 and config.parallel == "fsdp"
    return _Run(config, out, rank, world, vfile, device, teacher, tok, low, teacher_model, head, losses, fsdp)


def _load_student(run: _Run, texts: list[str], resume: bool) -> dict | None:
    """The student (the file loaded factored), what trains and its optimiser, the batches, and on
    ``resume`` the saved state, returned: its optimizer's state goes in once the optimizer is final."""
    config = run.config
    frozen = frozen_integers(run.vfile, config, run.fsdp)  # held as stored, not as float parameters
    student = run.student = load_factored(run.vfile.path, run.teacher, run.head, packed=frozen).to(run.device)
    # integer-stored tensors train through a straight-through quantizer: the loss is the file's
    student.vlora_store.quantization_aware = config.quantization_aware
    run.trainable = trainable_parameters(student, run.vfile, config)
    # float32 master weights for what trains, whatever the file stores; the frozen rest in bfloat16
    # when autocast does the maths in it anyway (fully_shard wants one dtype: it gathers in bf16)
    held = torch.bfloat16 if run.low and not run.fsdp else torch.float32
    for p in student.parameters():  # parameters only: buffers (rotary frequencies) keep their dtype
        p.data = p.data.float() if p.requires_grad else p.data.to(held)
    run.opt = optimizer(student, run.trainable, config)
    train_mode(student, config.checkpointing)

    run.limit = token_limit(student, config.max_length)
    run.batch_list = length_batches(run.tok, texts, config.batch_size, run.limit)
    run.state, run.resumed_from, saved = State(), None, None
    if resume:  # the trained tensors now, into whole replicas; the optimizer's once it is final
        saved = read_state(state_path(run.out), run.vfile, config)
        run.state = restore(saved, run.trainable)
        run.resumed_from = run.state.step
    return saved


def _score_and_heal_locally(run: _Run, texts: list[str], eval_data, progress: bool) -> bool:
    """The evaluator and the start's score, the teacher cache and the clock, then block-local healing
    unless a resumed run has done it; whether it ran now."""
    config, state, student = run.config, run.state, run.student
    # sharded models run forward only all together, so under fsdp every process scores (the same)
    run.autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.low)
    run.evaluator = (Evaluator(eval_data, run.teacher, student, run.teacher_model, config, run.autocast)
                     if eval_data and (run.rank == 0 or run.fsdp) else None)
    if run.evaluator and not state.evals:
        state.evals.append({"step": 0, "value": run.evaluator()})
        state.best = {"step": 0, "value": state.evals[-1]["value"], "tensors": None, "index": 0}

    run.cache = TeacherCache(config.cache_teacher, config.cache_bytes, run.fsdp)  # at most cache_bytes
    run.clock = time.perf_counter() - state.seconds  # earlier runs' time counts against --minutes
    local_steps = config.local_steps if config.local_steps is not None else default_local_steps(run.head, config.minutes)
    ran_local = bool(local_steps) and state.local is None
    if ran_local:
        # on whole replicas, before any sharding: one layer trains at a time, its gradients summed
        state.local = _heal_locally(student, run.teacher_model, run.vfile, run.tok, texts, eval_data, config,
                                    local_steps, run.head, run.limit, run.rank, run.world, progress, run.autocast)
        if run.evaluator:
            track(state, run.evaluator, run.trainable, phase="layer by layer", keep=run.rank == 0)
    run.local_seconds = state.local["seconds"] if state.local else 0.0
    return ran_local


def _distribute(run: _Run, saved: dict | None) -> None:
    """Student and teacher sharded (fsdp: what trains and its optimiser anew), or the student in
    DistributedDataParallel (ddp); then a resumed run's optimizer state."""
    student = run.model = run.student
    if run.fsdp:
        fully_shard_models(student, run.teacher_model, run.vfile.plan, run.low)
        run.trainable = trainable_parameters(student, run.vfile, run.config)  # fully_shard swapped in sharded parameters
        run.opt = optimizer(student, run.trainable, run.config)
    elif run.world > 1:
        device = run.device
        run.model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if saved is not None:
        restore_optimizer(saved, student, run.opt)


def _steps(run: _Run, progress: bool, on_step) -> None:
    """End-to-end steps until the budget is spent. A signal on any process stops every process after
    the same step, its state saved; Ctrl-C or a crash saves the state where it can."""
    state, config = run.state, run.config
    seen_here, start_step, run_started = 0, state.step, time.perf_counter()
    try:
        with Progress("healing", config.steps, enabled=progress and run.rank == 0) as bar, StopSignals() as stop:
            bar.advance(state.step)
            while True:
                # one clock and one stop for all processes, or they would leave the loop at different steps
                stopping, elapsed = stop.agree(run.world, run.device, time.perf_counter() - run.clock)
                if spent(state, config, elapsed):
                    break
                if stopping:  # SIGINT or SIGTERM (a cluster's time limit) on any process
                    run.save()
                    raise Interrupted(f"stopped at step {state.step} by a signal; state saved to {state_path(run.out)}: "
                                      "run the same command with `resume` to continue")
                value, n_tokens = _step(run, elapsed)
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
                if run.evaluator and config.eval_every and state.step % config.eval_every == 0:
                    track(state, run.evaluator, run.trainable, keep=run.rank == 0)
                if on_step is not None:
                    on_step(state.step, value)
                if state.step % config.save_every == 0:
                    run.save()
    except Interrupted:
        raise
    except BaseException as e:
        # a sharded run cannot gather from processes that are elsewhere: its last save stands
        if not run.fsdp and state.step > start_step:
            run.save()
        if isinstance(e, KeyboardInterrupt):
            saved_at = "" if run.fsdp else f"; state saved to {state_path(run.out)}: run the same command with `resume` to continue"
            raise Interrupted(f"interrupted at step {state.step}{saved_at}") from None
        raise


def _step(run: _Run, elapsed: float) -> tuple[float, int]:
    """One optimiser step on the batch that the step number picks: (its loss, the mean over every
    process; the batch's real tokens)."""
    config = run.config
    index = batch_index(run.state.step, len(run.batch_list), config.seed)
    inputs, mask = run.batch_list[index]
    n_tokens = int(mask.sum())
    rows = shard(inputs, mask, run.rank, run.world)
    goal = run.cache.targets(index, run.teacher_model, rows, run.losses, run.device, run.autocast)
    set_lr(run.opt, run.state, config, elapsed, run.local_seconds)
    with run.autocast:
        loss = student_loss(run.model, rows, goal, run.losses, config.temperature, run.device)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(run.trainable.values()), config.clip)
    run.opt.step()
    return global_mean(loss.detach(), run.world), n_tokens


def _finish(run: _Run, vlora_path, eval_name: str | None, started: float) -> HealReport:
    """The last stretch's mean loss and the last score; the best step's tensors written (the file as
    it was when the start scored best) and the state file removed, by rank 0; the report."""
    state, evaluator, config = run.state, run.evaluator, run.config
    if state.window:
        state.losses.append(sum(state.window) / len(state.window))
        state.window = []
    if evaluator and (not state.evals or state.evals[-1]["step"] != state.step):
        track(state, evaluator, run.trainable, keep=run.rank == 0)
    final = gather(run.trainable, keep=run.rank == 0, copy=False)  # rank 0 writes
    best = state.best
    if best is not None and best["index"] != len(state.evals) - 1:  # an earlier eval was best
        final = best["tensors"] if best["tensors"] is not None else {}  # None: the start, the file as it was
    if run.rank == 0:
        write_healed(run.vfile, final, run.out)
        state_path(run.out).unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return HealReport(
        str(vlora_path), str(run.out), state.step, state.tokens, seconds, str(run.device), run.world, state.losses,
        state.evals, evaluator.name if evaluator else None, evaluator.higher_is_better if evaluator else None,
        state.evals[0]["value"] if state.evals else None, best["value"] if best else None,
        best["step"] if best else None, run.resumed_from, eval_name, run.cache.bytes, state.local,
        memory(run.student, run.teacher_model, run.trainable, run.opt, run.cache.bytes), "bf16" if run.low else "fp32",
        {**asdict(config), "train": list(config.train), "losses": [list(x) for x in run.losses.items()]},
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
        return [(*shard(inputs, mask, rank, world), n)
                for inputs, mask, n in batches(tok, samples, config.local_batch_size, limit)]

    reduce = None
    if world > 1:
        import torch.distributed as dist

        reduce = dist.all_reduce
    seconds = 60 * config.minutes * config.local_share if config.minutes else None
    report = heal_locally(student, teacher_model, vfile.plan, sharded(train), sharded(held),
                          replace(config, local_steps=steps), seconds, autocast, progress and rank == 0, reduce)
    return report.to_dict()


def default_local_steps(head: str, minutes: float | None = None) -> int:
    """Block-local healing first for causal LMs, where end-to-end distillation in CPU-minutes made
    SmolLM2 worse; none for the rest, whose end-to-end recipe was measured on MiniLM. With a time
    budget, as many steps as its share of the minutes allows (more steps kept paying on SmolLM2)."""
    if head != "causal-lm":
        return 0
    return 10**9 if minutes else LOCAL_STEPS
