"""The student as it trains: which of its parameters train (the file's bases and increment factors,
the stacks' 1-D parameters) and which are frozen, its optimiser, and its mode (dropout off;
gradient checkpointing where asked)."""

from __future__ import annotations

import torch

from ..errors import VloraError
from ..io.fileformat import VloraFile, factorised_keys
from ..io.models import param_for_key
from ..forms.stored import plan_roles
from .config import HealConfig


def trainable_parameters(student, vfile: VloraFile, config: HealConfig) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for what trains; everything else is frozen."""
    for p in student.parameters():
        p.requires_grad_(False)
    out, roles = {}, plan_roles(vfile.plan)  # a shared basis is a factor: it trains with the increments
    for name, p in student.vlora_store.items():
        if trained_as(roles, name) in config.train:
            out[name] = p
    if "dense" in config.train:
        out.update(_stack_dense(student, vfile))
    if not out:
        raise VloraError("nothing to train: every stored tensor is frozen")
    for p in out.values():
        p.requires_grad_(True)
    return out


def frozen_integers(vfile: VloraFile, config: HealConfig, fsdp: bool) -> set[str] | bool:
    """The integer-stored bases and factors that do not train, which the student holds as stored
    (load_factored's ``packed``: int4 about an eighth of float32, dequantized one matrix a call);
    False under fsdp, which shards parameters and buffers of one float dtype."""
    if fsdp:
        return False
    roles = plan_roles(vfile.plan)
    return {name for name in vfile.quantized if name in roles and trained_as(roles, name) not in config.train}


def trained_as(roles: dict[str, str], name: str) -> str:
    """What ``--train``/``--freeze`` call a stored tensor: increments (a factor, a shared basis
    included) or bases."""
    return "increments" if roles.get(name) == "factor" else "bases"


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


def optimizer(student, trainable: dict, config: HealConfig) -> torch.optim.Optimizer:
    """AdamW over bases and factors at ``lr``, the stack's 1-D parameters at ``lr_dense``."""
    stored = set(student.vlora_store.names)
    groups = [{"params": [p for n, p in trainable.items() if n in stored], "lr": config.lr},
              {"params": [p for n, p in trainable.items() if n not in stored], "lr": config.lr_dense or config.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def train_mode(student, checkpointing: bool) -> None:
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
