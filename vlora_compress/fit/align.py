"""Align each layer to the one before it, so consecutive-layer deltas measure real differences.

A transformer block computes the same function when its MLP's hidden neurons are permuted, or when
its attention heads are permuted and each head's query/key (and value/output) spaces are rotated
together. Training fixes these symmetries arbitrarily in every layer, which inflates ‖W_l − W_l-1‖.
Here each layer, in order, is mapped onto its (already aligned) predecessor:

- MLP neurons by an optimal assignment on the similarity of their input and output weights (gate
  and up move together in gated MLPs);
- heads by an assignment on how well their QK and VO maps match after the best orthogonal rotation
  (Procrustes), then rotated by it. Under RoPE only rotations that commute with it are allowed: a
  2-D rotation in each frequency pair of the query/key head space (and any rotation of the dims
  partial rotary leaves alone). With grouped-query attention whole key/value groups move, their
  query heads with them. Where a model's attention holds anything that could break this (norms
  on queries or keys, sinks, an unknown rotary variant), heads stay put and only MLP neurons move.

Biases move with their rows; the residual stream is never touched. The aligned checkpoint computes
the same outputs as the original to float tolerance (tests check BERT, GPT-2 and Llama).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from ..io.stacks import Stack, layer_key


@dataclass(frozen=True)
class Layout:
    """Where a block's attention and MLP weights are, for one architecture family."""

    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # gate and up for gated MLPs
    mlp_out: str
    conv1d: bool = False  # GPT-2 stores (in, out); everything here works on (out, in)
    fused_qkv: bool = False  # GPT-2's c_attn holds q, k and v side by side
    rope: bool = False
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    rotary_dim: int = 0  # with rope: the leading dims of a head that rotate, in pairs (i, i + rotary_dim/2)
    align_heads: bool = True  # False: only MLP neurons move (heads could not be proved safe to rotate)


LAYOUTS = {
    "bert": dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                 o="attention.output.dense", mlp_in=("intermediate.dense",), mlp_out="output.dense"),
    "gpt2": dict(q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj", mlp_in=("mlp.c_fc",),
                 mlp_out="mlp.c_proj", conv1d=True, fused_qkv=True),
    "llama": dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                  mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", rope=True),
}
# Models with Llama's tensor names whose attention rotates each head's pairs (i, i + d/2) with
# rotate_half, over the whole head, or with a partial factor over its leading dims (the rest pass
# through). Any rope_type (linear, dynamic, yarn, llama3, longrope) keeps those pairs; other
# models with these names (interleaved pairs, as Cohere's) get their MLP aligned and heads left.
ROTATE_HALF = {"llama", "mistral", "qwen2", "gemma", "olmo", "granite", "stablelm", "persimmon"}
PARTIAL_ROTARY = {"stablelm", "persimmon"}  # rotate only the leading partial_rotary_factor of a head
GPT2_BUFFERS = {"attn.bias", "attn.masked_bias"}  # causal masks older GPT-2 checkpoints store


def detect_layout(stack: Stack, config: dict | None) -> tuple[Layout | None, str]:
    """The stack's layout and head geometry, or None with the reason alignment is skipped.

    Heads are aligned only where every rotation used provably leaves the attention unchanged; where
    it cannot be proved (an unknown rotary variant, norms on queries or keys, per-head tensors such
    as attention sinks) the layout says so and only MLP neurons are permuted, which is always safe."""
    suffixes = {f.suffix for f in stack.families}
    for name, spec in LAYOUTS.items():
        needed = {spec["q"], spec["k"], spec["v"], spec["o"], *spec["mlp_in"], spec["mlp_out"]}
        if {s + ".weight" for s in needed} <= suffixes:
            break
    else:
        return None, f"{stack.prefix}: no known attention/MLP layout (BERT, GPT-2 or Llama names)"
    config = config or {}
    heads = config.get("num_attention_heads") or config.get("n_head")
    if not heads:
        return None, f"{stack.prefix}: the head count is unknown (no config.json): heads cannot be aligned safely"
    kv = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    head_dim = config.get("head_dim") or hidden // heads
    factor = _partial_rotary_factor(config) if spec.get("rope") else 0
    layout = Layout(**spec, heads=heads, kv_heads=kv, head_dim=head_dim, rotary_dim=int(head_dim * factor))
    why_not = _heads_unsafe(stack, layout, config)
    if why_not is None and factor != 1 and layout.rope:
        if config.get("model_type") not in PARTIAL_ROTARY:
            why_not = f"partial rotary embeddings (factor {factor}) in a {config.get('model_type')!r} model"
        elif layout.rotary_dim % 2:
            why_not = f"an odd number of rotary dimensions ({layout.rotary_dim})"
    if why_not is not None:
        return replace(layout, align_heads=False), f"{stack.prefix}: aligned as {name}, MLP neurons only: {why_not}"
    rotary = f", rotary over {layout.rotary_dim} of {head_dim} head dims" if 0 < layout.rotary_dim < head_dim else ""
    return layout, f"{stack.prefix}: aligned as {name}{rotary}"


def _heads_unsafe(stack: Stack, layout: Layout, config: dict) -> str | None:
    """Why rotating and permuting heads might change this model, or None when it provably does not."""
    if layout.rope and config.get("model_type") not in ROTATE_HALF:
        return f"rotary embeddings of a {config.get('model_type')!r} model are not known to pair dims as Llama's"
    module = layout.q.rpartition(".")[0] + "."
    allowed = {f"{n}.{part}" for n in (layout.q, layout.k, layout.v, layout.o) for part in ("weight", "bias")}
    allowed |= GPT2_BUFFERS if layout.conv1d else set()
    prefix = f"{stack.prefix}.{stack.layers[0]}." if stack.prefix else f"{stack.layers[0]}."
    for key in stack.keys:
        suffix = key[len(prefix):] if key.startswith(prefix) else None
        if suffix is not None and suffix.startswith(module) and suffix not in allowed:
            return f"the attention also holds {suffix!r} (a query/key norm or a per-head tensor)"
    return None


def _partial_rotary_factor(config: dict) -> float:
    """transformers 5 keeps it in rope_parameters; older configs at the top level or in rope_scaling."""
    for where in (config.get("rope_parameters"), config, config.get("rope_scaling")):
        if isinstance(where, dict) and where.get("partial_rotary_factor") is not None:
            return float(where["partial_rotary_factor"])
    return 1.0


def read_config(folder: str | Path | None) -> dict | None:
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def align_stack(stack: Stack, layout: Layout, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Aligned tensors for every attention and MLP weight and bias of the stack (others unchanged)."""
    out: dict[str, torch.Tensor] = {}
    prev = None
    for layer in stack.layers:
        block = _Block.load(stack.prefix, layer, layout, read)
        if prev is not None:
            block.align_mlp(prev)
            if layout.align_heads:
                block.align_heads(prev)
        out.update(block.tensors())
        prev = block
    return out


class _Block:
    """One layer's weights in (out, in) orientation, split per head, float64."""

    def __init__(self, prefix, layer, layout: Layout, read):
        self.prefix, self.layer, self.layout, self.read = prefix, layer, layout, read
        self.t: dict[str, torch.Tensor | None] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    @classmethod
    def load(cls, prefix, layer, layout: Layout, read) -> "_Block":
        b = cls(prefix, layer, layout, read)
        names = {layout.o, layout.mlp_out, *layout.mlp_in}
        names |= {layout.q} if layout.fused_qkv else {layout.q, layout.k, layout.v}
        for name in names:
            for part in ("weight", "bias"):
                key = layer_key(prefix, layer, f"{name}.{part}")
                try:
                    raw = read(key)
                except KeyError:
                    continue
                b.dtypes[key] = raw.dtype
                x = raw.double()
                if part == "weight" and layout.conv1d:
                    x = x.T
                b.t[key] = x
        return b

    def key(self, name: str, part: str = "weight") -> str:
        return layer_key(self.prefix, self.layer, f"{name}.{part}")

    def get(self, name, part="weight"):
        return self.t.get(self.key(name, part))

    # q, k, v as (rows, in) views, whether fused or not
    def qkv(self, which: str, part: str = "weight"):
        lay = self.layout
        if not lay.fused_qkv:
            return self.get({"q": lay.q, "k": lay.k, "v": lay.v}[which], part)
        full = self.get(lay.q, part)
        if full is None:
            return None
        h = lay.heads * lay.head_dim
        return full[{"q": 0, "k": h, "v": 2 * h}[which]:][:h]

    def set_qkv(self, which, value, part="weight"):
        lay = self.layout
        if not lay.fused_qkv:
            self.t[self.key({"q": lay.q, "k": lay.k, "v": lay.v}[which], part)] = value
            return
        h = lay.heads * lay.head_dim
        start = {"q": 0, "k": h, "v": 2 * h}[which]
        full = self.get(lay.q, part).clone()
        full[start:start + h] = value
        self.t[self.key(lay.q, part)] = full

    def align_mlp(self, prev: "_Block") -> None:
        lay = self.layout
        feats = lambda b: torch.cat([b.get(n) for n in lay.mlp_in] + [b.get(lay.mlp_out).T], dim=1)  # noqa: E731
        sim = feats(self) @ feats(prev).T  # [mine, theirs]
        rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)  # scipy: the CPU's
        perm = torch.as_tensor(rows[cols.argsort()], device=sim.device)  # my neuron for each of theirs
        for name in lay.mlp_in:
            for part in ("weight", "bias"):
                if self.get(name, part) is not None:
                    self.t[self.key(name, part)] = self.get(name, part)[perm]
        self.t[self.key(lay.mlp_out)] = self.get(lay.mlp_out)[:, perm]

    def align_heads(self, prev: "_Block") -> None:
        lay = self.layout
        hd, group = lay.head_dim, lay.heads // lay.kv_heads
        q, k, v, o = self.qkv("q"), self.qkv("k"), self.qkv("v"), self.get(lay.o)
        pq, pk, pv, po = prev.qkv("q"), prev.qkv("k"), prev.qkv("v"), prev.get(lay.o)
        row = lambda w, i: w[i * hd:(i + 1) * hd]  # noqa: E731
        col = lambda w, i: w[:, i * hd:(i + 1) * hd]  # noqa: E731

        def maps(g: int, h: int):
            """Cross-products of my kv group g with their group h: for QK and for VO."""
            m_qk = row(pk, h) @ row(k, g).T + sum(row(pq, h * group + j) @ row(q, g * group + j).T
                                                  for j in range(group))
            m_vo = row(pv, h) @ row(v, g).T + sum(col(po, h * group + j).T @ col(o, g * group + j)
                                                  for j in range(group))
            return m_qk, m_vo

        n = lay.kv_heads
        score = torch.zeros(n, n, dtype=torch.float64)  # on the CPU: scipy's assignment reads it
        for g in range(n):
            for h in range(n):
                m_qk, m_vo = maps(g, h)
                score[g, h] = _procrustes(m_qk, lay.rotary_dim)[1] + _procrustes(m_vo)[1]
        rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
        mine_for = rows[cols.argsort()]  # my kv group that goes where their group h is
        qb, kb, vb = self.qkv("q", "bias"), self.qkv("k", "bias"), self.qkv("v", "bias")
        new = {name: [] for name in ("q", "k", "v", "q_bias", "k_bias", "v_bias", "o")}
        for h in range(n):
            g = int(mine_for[h])
            m_qk, m_vo = maps(g, h)
            r_qk, _ = _procrustes(m_qk, lay.rotary_dim)  # shared by the group's key head and its query heads
            r_vo, _ = _procrustes(m_vo)
            new["k"].append(r_qk @ row(k, g))
            new["v"].append(r_vo @ row(v, g))
            if kb is not None:
                new["k_bias"].append(r_qk @ row(kb, g))
            if vb is not None:
                new["v_bias"].append(r_vo @ row(vb, g))
            for j in range(group):
                new["q"].append(r_qk @ row(q, g * group + j))
                if qb is not None:
                    new["q_bias"].append(r_qk @ row(qb, g * group + j))
                new["o"].append(col(o, g * group + j) @ r_vo.T)
        for which in ("q", "k", "v"):
            self.set_qkv(which, torch.cat(new[which]))
            if new[which + "_bias"]:
                self.set_qkv(which, torch.cat(new[which + "_bias"]), "bias")
        self.t[self.key(lay.o)] = torch.cat(new["o"], dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, x in self.t.items():
            if key.endswith(".weight") and self.layout.conv1d:
                x = x.T
            out[key] = x.to(self.dtypes[key]).contiguous()
        return out


def _procrustes(m: torch.Tensor, rotary_dim: int = 0) -> tuple[torch.Tensor, float]:
    """The orthogonal R maximising tr(Rᵀ M), and that maximum.

    With ``rotary_dim``, R is restricted to what commutes with rotary position embeddings over a
    head's leading ``rotary_dim`` dims: a 2-D rotation in each frequency pair (i, i + rotary_dim/2),
    and any rotation of the dims past them, which pass through unrotated (partial rotary).
    """
    if not rotary_dim:
        u, s, vh = torch.linalg.svd(m)
        return u @ vh, float(s.sum())
    r = torch.zeros_like(m)
    total = 0.0
    half = rotary_dim // 2
    for i in range(half):
        a, b = i, i + half
        c = m[a, a] + m[b, b]
        s_ = m[b, a] - m[a, b]
        norm = float(torch.hypot(c, s_))
        cos, sin = (c / norm, s_ / norm) if norm > 0 else (1.0, 0.0)
        r[a, a], r[a, b], r[b, a], r[b, b] = cos, -sin, sin, cos
        total += norm
    if rotary_dim < m.shape[0]:
        r[rotary_dim:, rotary_dim:], rest = _procrustes(m[rotary_dim:, rotary_dim:])
        total += rest
    return r, total
