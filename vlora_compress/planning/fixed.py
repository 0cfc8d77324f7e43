"""The plan that needs no measurement: the form the config asks for (space.reference) at
``config.rank`` over equal chunks of each stack, the first layer of each chunk its base."""

from __future__ import annotations

from ..config import CompressConfig
from ..errors import VloraError
from ..io.stacks import Stack
from ..plan import Plan, StackPlan, split_equal
from .space import reference


def plan_equal(stacks: list[Stack], config: CompressConfig) -> Plan:
    """The core plan: equal chunks, the first layer of each chunk as base, a closed-loop chain.

    With ``method="svd"`` every family is one star chunk over a zero base: per-layer truncated SVD,
    the obvious alternative every VLoRA result is measured against; with ``method="dense"`` every
    layer is stored whole (in ``quantize``'s integers: quantization alone, the other one).
    """
    stack_plans, family_plans, notes = [], [], []
    for stack in stacks:
        cand = reference(config, len(stack.layers))
        chunks = (config.chunks or 1) if cand.spec.chunked else 1
        if chunks > len(stack.layers):
            raise VloraError(
                f"`chunks` {config.chunks} is more than the {len(stack.layers)} layers of stack {stack.prefix!r}"
            )
        bounds = split_equal(len(stack.layers), chunks)
        stack_plans.append(StackPlan(stack.prefix, stack.layers, bounds))
        for fam in stack.families:
            rank = min(config.rank, *fam.shape)
            if rank < config.rank:
                notes.append(f"{fam.name}: rank {config.rank} clipped to {rank}, the full rank of {list(fam.shape)}")
            groups = [tuple(layer for layer in stack.layers[a:b] if layer in fam.layers) for a, b in bounds]
            fp = cand.spec.layout(fam, cand, rank, config, groups)
            if cand.spec.ranked and all(r == 0 for c in fp.chunks for r in c.ranks) and \
                    len(fp.chunks) == len(fam.layers) > 1:
                notes.append(f"{fam.name}: stored dense: rank-{rank} factors would cost more than the matrices")
            family_plans.append(fp)
    return Plan(tuple(stack_plans), tuple(family_plans), tuple(notes))
