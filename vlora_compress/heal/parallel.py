"""Healing on several processes: the process group torchrun describes, data parallel's shares of a
batch, torch's ``fully_shard`` (fsdp), and gathers and reductions in which every process takes part.

In one process (no ``WORLD_SIZE``, or 1) every helper here is a no-op or the plain tensor.
"""

from __future__ import annotations

import os

import torch

from ..io.models import resolve_device


def join_group(device_name: str) -> bool:
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


def distributed() -> tuple[int, int]:
    """(rank, world size) in the process group joined, or (0, 1) in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def fully_shard_models(student, teacher, plan, low: bool) -> None:
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


def gather(trainable: dict, keep: bool, copy: bool = True) -> dict[str, torch.Tensor]:
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


def local_bytes(tensors) -> int:
    """Bytes of ``tensors`` held by this process: their shards where they are sharded."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def everywhere(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def shard(inputs: dict, mask: torch.Tensor, rank: int, world: int) -> tuple[dict, torch.Tensor]:
    """This process's rows of a batch (data parallel): the whole batch in one process."""
    if world == 1:
        return inputs, mask
    return {k: v.chunk(world)[rank] for k, v in inputs.items()}, mask.chunk(world)[rank]


def global_mean(loss: torch.Tensor, world: int) -> float:
    """The mean of ``loss`` over all processes."""
    if world > 1:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return float(loss)
