"""Run a VLoRA file in transformers at its size: ``from_pretrained(DIR, trust_remote_code=True)``.

Written beside the file by ``vlora-export --format transformers-remote`` (vlora-compress). It
imports transformers, torch and safetensors only. It builds the original architecture from
``config.json``, loads the tensors the file stores as they are, and replaces every factorised
Linear by a layer that holds its chunk's stored base and increments (integers as stored) and
forms its weight for each call as the VLoRA format's rebuild rule says (docs/format.md, section
6): float32 ``base + B1 A1 + B2 A2 + ...`` along the path from the chunk's base, then the
family's dtype. A base or factor shared by several layers is held once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

FILE = "model.vlora.safetensors"
BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2, "int3-midrise": 3, "int2-midrise": 2}
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def dequantize(q: torch.Tensor, scale: torch.Tensor, shape, scheme: str, group: int) -> torch.Tensor:
    """float32 values of stored integers: int8 one scale a row; narrower grids a little-endian bit
    stream a row of ``code = q + 2^(b-1)``, one scale a group (mid-rise grids half a step up)."""
    rows, cols = shape
    if scheme == "int8":
        return q.float() * scale.float()
    bits = BITS[scheme]
    stream = ((q[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(rows, -1)[:, : cols * bits]
    codes = (stream.reshape(rows, cols, bits).to(torch.int32) << torch.arange(bits, dtype=torch.int32)).sum(-1)
    values = codes.float() - (1 << (bits - 1)) + (0.5 if scheme.endswith("midrise") else 0.0)
    return values * scale.float().repeat_interleave(group, 1)[:, :cols]


class Stored(torch.nn.Module):
    """A base or factor as the file stores it: floats, or integers and their scales."""

    def __init__(self, f, name: str, shape, scheme: str, group: int, dtype: torch.dtype):
        super().__init__()
        self.shape, self.scheme, self.group, self.dtype = tuple(shape), scheme, group, dtype
        self.register_buffer("data", f.get_tensor(name))
        self.register_buffer("scale", f.get_tensor(name + ".scale") if scheme != "none" else torch.empty(0))

    def value(self) -> torch.Tensor:
        """float32, through the family's store dtype as a reader of the format gives it."""
        if self.scheme == "none":
            return self.data.float()
        return dequantize(self.data, self.scale, self.shape, self.scheme, self.group).to(self.dtype).float()


class VloraLinear(torch.nn.Module):
    """A Linear whose weight is its chunk's base plus the increments on the path to it."""

    def __init__(self, store: dict, base: str | None, path: list, shape, dtype, bias, out_in: bool):
        super().__init__()
        self.__dict__["store"] = store  # held once by the model, not by each layer
        self.base, self.path, self.shape, self.dtype, self.bias, self.out_in = base, path, tuple(shape), dtype, bias, out_in

    def weight_value(self) -> torch.Tensor:
        w = self.store[self.base].value() if self.base else None
        for b, a in self.path:
            bv, av = self.store[b].value(), self.store[a].value()
            w = torch.addmm(torch.zeros(self.shape, device=bv.device) if w is None else w, bv, av)
        return (torch.zeros(self.shape) if w is None else w).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_value().to(x.dtype)
        y = F.linear(x, w) if self.out_in else x @ w
        return y if self.bias is None else y + self.bias


def _key(stack: str, layer, suffix: str) -> str:
    return f"{stack}.{layer}.{suffix}" if stack else f"{layer}.{suffix}"


def _steps(chunk: dict) -> list:
    layers, base, topology = chunk["layers"], chunk["base"], chunk.get("topology", "chain")
    if topology != "chain":
        return [(layer, None) for layer in layers if layer != base]
    if not isinstance(base, int):
        return [(layer, prev) for prev, layer in zip([None] + layers[:-1], layers)]
    p = layers.index(base)
    return ([(layers[i], layers[i - 1]) for i in range(p + 1, len(layers))]
            + [(layers[i], layers[i + 1]) for i in range(p - 1, -1, -1)])


def family_layers(fam: dict) -> dict:
    """layer key -> (base name or None, [(B, A) names along the path], {name: shape, scheme})."""
    stack, suffix, (m, n) = fam["stack"], fam["suffix"], fam["shape"]
    quant, base_quant, out, stored = fam.get("quant", "none"), fam.get("base_quant"), {}, {}
    for c, chunk in enumerate(fam["chunks"]):
        base = chunk["base"]
        base_name = (_key(stack, base, suffix) if isinstance(base, int) else
                     _key(stack, f"vlora_base{c}", suffix) if base == "synthetic" else None)
        if base_name:
            stored[base_name] = ((m, n), base_quant or quant)
        if isinstance(base, int):
            out[base_name] = (base_name, [])
        basis = _key(stack, f"vlora_basis{c}", suffix) if chunk.get("topology") in ("shared", "shared-left") else None
        residual = dict(zip(chunk["layers"], chunk.get("residual") or [0] * len(chunk["layers"])))
        paths = {}
        for layer, ref in _steps(chunk):
            key, rank = _key(stack, layer, suffix), chunk["ranks"][chunk["layers"].index(layer)]
            own = []
            if rank:
                if chunk.get("topology") == "shared-left":
                    own = [(basis, key + ".vlora_A")]
                    stored[basis], stored[key + ".vlora_A"] = ((m, rank), quant), ((rank, n), quant)
                else:
                    own = [(key + ".vlora_B", basis or key + ".vlora_A")]
                    stored[key + ".vlora_B"], stored[basis or key + ".vlora_A"] = ((m, rank), quant), ((rank, n), quant)
            if residual[layer]:
                r = residual[layer]
                own.append((key + ".residual.vlora_B", key + ".residual.vlora_A"))
                stored[own[-1][0]], stored[own[-1][1]] = ((m, r), quant), ((r, n), quant)
            over = ref is None or ref == base
            paths[layer] = ([] if over else paths[ref]) + own
            out[key] = (base_name, paths[layer])
    return out, stored


class VloraForCausalLM:
    """Loads a VLoRA file into its original architecture (transformers' auto class for the head)."""

    auto = "AutoModelForCausalLM"

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """transformers registers a remote class with its auto class; the model built is the
        original architecture's own class, so there is nothing to register."""

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        import transformers

        folder = Path(path)
        config = copy.deepcopy(config or transformers.AutoConfig.from_pretrained(folder))
        if hasattr(config, "auto_map"):
            del config.auto_map  # the original architecture, built by transformers itself
        model = getattr(transformers, cls.auto).from_config(config)
        with safe_open(str(folder / FILE), "pt") as f:
            meta = f.metadata()
            plan, source = json.loads(meta["vlora.plan"]), json.loads(meta["vlora.source"])
            factorised, store = {}, torch.nn.Module()
            names = {}
            for fam in plan["families"]:
                layers, stored = family_layers(fam)
                for name, (shape, scheme) in stored.items():
                    names[name] = Stored(f, name, shape, scheme, fam.get("group_size", 128), DTYPES[fam["store_dtype"]])
                for key, (base, path_) in layers.items():
                    factorised[key] = (base, path_, fam)
            passthrough = {q["key"]: q for q in plan.get("passthrough", [])}
            dtypes = {key: DTYPES.get(dt) for key, dt, _ in source["tensors"]}
            state = {}
            for key, _, shape in source["tensors"]:
                if key in factorised:
                    continue
                if key in passthrough:
                    q = passthrough[key]
                    state[key] = dequantize(f.get_tensor(key), f.get_tensor(key + ".scale"), shape, q["quant"],
                                            q["group_size"]).to(dtypes[key])
                else:
                    state[key] = f.get_tensor(key)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{folder / FILE}: {unexpected[0]} is not a tensor of {type(model).__name__}")
        for i, (name, stored) in enumerate(names.items()):
            store.add_module(str(i), stored)
        model.add_module("vlora_store", store)
        for key, (base, path_, fam) in factorised.items():
            module_name = key[: -len(".weight")]
            parent, _, attr = module_name.rpartition(".")
            old = model.get_submodule(module_name)
            out_in = isinstance(old, torch.nn.Linear)
            setattr(model.get_submodule(parent) if parent else model, attr,
                    VloraLinear(names, base, path_, fam["shape"], DTYPES[fam["dtype"]], old.bias, out_in))
        model.tie_weights()
        return model.eval()


class VloraModel(VloraForCausalLM):
    auto = "AutoModel"
