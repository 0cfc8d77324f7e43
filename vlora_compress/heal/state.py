"""The resumable state of a healing run: what it holds, the file beside the output it is saved to
(atomically, by rank 0), reading it back with its checks, and restoring tensors, RNG and optimizer.

A state resumes on one process, under ddp or under fsdp, on any number of processes: the tensors
and the optimizer's state are saved whole, keyed by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import VloraError
from ..io.fileformat import VloraFile
from ..io.write import atomic_output
from .config import HealConfig
from .parallel import gather

STATE_VERSION = 2  # 2: the optimizer's state keyed by parameter name


@dataclass
class State:
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


def save_state(path: Path, state: State, vfile: VloraFile, config: HealConfig, trainable, opt,
               rank: int, student, sharded: bool) -> None:
    """The resumable state, written atomically by rank 0. When ``sharded`` (fully_shard) every
    process must call it: the tensors and the optimizer's state are gathered whole. Either way the
    optimizer's state is torch's full state dict, keyed by parameter name, so a state resumes on
    one process, under ddp or under fsdp, on any number of processes."""
    if not sharded and rank != 0:
        return
    tensors = gather(trainable, keep=rank == 0, copy=False)
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


def read_state(path: Path, vfile: VloraFile, config: HealConfig) -> dict:
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


def restore(blob: dict, trainable) -> State:
    """The saved tensors into the (whole, not yet sharded) trainable parameters, and the RNG."""
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(blob["trainable"][n])
    torch.set_rng_state(blob["rng"])
    return State(**blob["state"])


def restore_optimizer(blob: dict, student, opt) -> None:
    """The saved whole optimizer state into ``opt`` (each process takes its shard when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if blob["optimizer"]:  # saved before the first end-to-end step: nothing to load
        set_optimizer_state_dict(student, opt, blob["optimizer"], options=StateDictOptions(full_state_dict=True))


def _identity(vfile: VloraFile) -> dict:
    """The file being healed, as a state records it: a state resumes on the same file only."""
    st = vfile.path.stat()
    return {"name": vfile.path.name, "bytes": st.st_size, "sha256": vfile.source.sha256}
