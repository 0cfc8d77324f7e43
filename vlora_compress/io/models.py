"""Run real models through Hugging Face transformers, offline: dense folders and VLoRA files alike.

Needs the ``hf`` extra. Nothing here downloads: the hub is switched off before transformers loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io.checkpoint import DTYPES, open_checkpoint
from ..errors import VloraError
from ..runtime.expand import expand

HEADS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}


def hf():
    """transformers, imported offline and quiet; a clear error if the extra is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise VloraError("running models needs transformers: pip install 'vlora-compress[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def config_folder(path: str | Path) -> Path:
    """The folder holding config.json for ``path``: the folder itself, or the folder of a file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise VloraError(f"{folder}: has no config.json; name the original model folder with `config_dir`")
    return folder


def head_of(config) -> str:
    """Which head the checkpoint was trained with, from ``config.architectures`` (a config, or its
    config.json as a dict)."""
    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    for arch in archs or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
    return "base"


def pooled_embedding(outputs, mask):
    """Mean over real tokens (``mask``; None: every one) of the last hidden state, normalised: the
    sentence (or image) embedding."""
    h = outputs.last_hidden_state
    m = mask[..., None].to(h.dtype) if mask is not None else torch.ones_like(h[..., :1])
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def load_model(path: str | Path, config_dir: str | Path | None = None, head: str | None = None,
               dtype: torch.dtype | None = None):
    """A ready model in eval mode from a dense model folder, a dense .safetensors file or a VLoRA file.

    Files need the original's config: ``config_dir``, or a config.json beside the file. ``dtype``
    loads a folder straight into that dtype (a bf16 teacher never exists in float32); None keeps
    what transformers picks.
    """
    t = hf()
    path = Path(path)
    if not path.exists():
        raise VloraError(f"{path}: no such file or folder")
    folder = Path(config_dir) if config_dir is not None else None
    if path.is_dir() and folder is None:
        config = _config(t, config_folder(path))
        cls = getattr(t, HEADS[head or head_of(config)])
        try:
            model = cls.from_pretrained(path, local_files_only=True, **({"dtype": dtype} if dtype else {}))
        except (OSError, ValueError) as e:
            raise VloraError(f"{path}: transformers cannot load it ({str(e).splitlines()[0]})") from None
        return model.eval()
    model = load_state_dict_model(path, folder, head, _state_dict(path))
    if dtype is not None:  # parameters only, as from_pretrained does: rotary frequencies stay float32
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def load_state_dict_model(path: str | Path, config_dir: str | Path | None, head: str | None,
                          state_dict: dict[str, torch.Tensor]):
    """A model from the config in ``config_dir`` (or beside ``path``) and checkpoint tensors."""
    t = hf()
    path = Path(path)
    folder = config_folder(config_dir if config_dir is not None else path)
    config = _config(t, folder)
    cls = _concrete(t, HEADS[head or head_of(config)], config)
    try:
        # transformers' own loading: key renames, base-model prefixes and tied weights as it does them
        model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True)
    except (RuntimeError, ValueError) as e:
        raise VloraError(f"{path}: does not match the config in {folder} ({str(e).splitlines()[0][:200]})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise VloraError(f"{path}: does not match the config in {folder}: it has no weight for {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise VloraError(f"{path}: does not match the config in {folder}: {list(mismatched)[0]} has another shape")
    return model.eval()


def load_by_layer(path: str | Path, config_dir: str | Path | None, head: str | None, ckpt,
                  held_back: set[str], device: torch.device):
    """A model whose ``held_back`` weights are not loaded, and how to load them one layer at a time.

    Returns ``(model, params)``, ``params`` mapping each held-back checkpoint key to its parameter,
    which holds a one-element placeholder broadcast to the weight's shape (it costs no memory; the
    caller puts the real tensor in before the layer runs and the placeholder back after). Everything
    else is loaded by transformers as usual and moved to ``device``. None when some held-back key
    does not name a parameter of the model by name (transformers renamed it): the caller loads the
    model whole instead. Only transformers 5 keeps the placeholders as they are (4.x copies them
    into full tensors: correct, but no memory saved).
    """
    state = {key: _placeholder(ckpt.infos[key].shape, DTYPES[ckpt.infos[key].dtype])
             if key in held_back else ckpt.read(key) for key in ckpt.infos}
    model = load_state_dict_model(path, config_dir, head, state)
    del state
    params = {}
    for key in held_back:
        param = param_for_key(model, key)  # by name only: placeholders have no values to match
        if param is None:
            return None
        params[key] = param
    placeholders = {id(p) for p in params.values()}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                p.data = _placeholder(p.shape, p.dtype, device) if id(p) in placeholders else p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    return model, params


def _placeholder(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """One zero broadcast to ``shape``: a stand-in for a weight that is not loaded (stride 0)."""
    return torch.zeros((), dtype=dtype, device=device).expand(tuple(shape))


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def vlora_model(vlora_path: str | Path, config_dir: str | Path, head: str | None = None):
    """A transformers model with the VLoRA file's weights, expanded in memory."""
    return load_model(vlora_path, config_dir, head)


def load_preprocessor(folder: str | Path):
    """The tokenizer, or for vision models the image processor, saved with the model."""
    t = hf()
    folder = config_folder(folder)
    if (folder / "preprocessor_config.json").is_file():
        return t.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    try:
        return t.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise VloraError(f"{folder}: has no tokenizer or image processor ({str(e).splitlines()[0]})") from None


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, this process's GPU under torchrun), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VloraError(f"`device` {name!r} is not a device name (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise VloraError(f"`device` {name!r} is not available here")
    if device.type not in ("cpu", "cuda"):
        raise VloraError(f"`device` {name!r}: this tool runs on cpu or cuda")
    return device


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has: a GPU's own, or the host's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def token_limit(model, requested: int) -> int:
    """``requested``, capped at the positions the model has (GPT-2's n_positions, BERT's 512, ...)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(requested, limit) if limit else requested


def takes_text(preprocessor) -> bool:
    return hasattr(preprocessor, "tokenize")


def batches(preprocessor, samples: list, batch_size: int, max_length: int):
    """(model inputs, token mask or None, number of samples) per batch, in the samples' order."""
    text = takes_text(preprocessor)
    if text and getattr(preprocessor, "pad_token", None) is None and getattr(preprocessor, "eos_token", None):
        preprocessor.pad_token = preprocessor.eos_token  # GPT-2 style tokenizers have no pad token
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        if text:
            enc = preprocessor(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            yield dict(enc), enc["attention_mask"].bool(), len(chunk)
        else:
            yield dict(preprocessor(images=chunk, return_tensors="pt")), None, len(chunk)


def module_for_key(model: torch.nn.Module, key: str, read=None):
    """(name, module) whose ``weight`` is checkpoint tensor ``key``, or None.

    By name first, allowing for the base-model prefix; else, given ``read(key)`` for the
    checkpoint's tensor, by value, which survives the key renames newer transformers versions
    apply when they load. The tensor is read only when the name does not match.
    """
    modules = dict(model.named_modules())
    if key.endswith(".weight"):
        name = key[: -len(".weight")]
        prefix = getattr(model, "base_model_prefix", "")
        for candidate in (name, f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None):
            if candidate and candidate in modules:
                return candidate, modules[candidate]
    if read is None:
        return None
    weight = read(key)
    want = _fingerprint(weight)
    for name, module in modules.items():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.shape == weight.shape and _fingerprint(w) == want:
            return name, module
    return None


def set_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], read=None) -> None:
    """Put checkpoint tensors (weights and biases of linear layers) into a loaded model, in place.

    Modules are found before anything changes, so finding one by value still sees the originals.
    """
    targets = []
    for key, tensor in tensors.items():
        param = param_for_key(model, key, read)
        if param is None:
            raise VloraError(f"cannot find {key} in the model")
        targets.append((param, tensor))
    for param, tensor in targets:
        param.data = tensor.to(param.dtype).reshape(param.shape)


def param_for_key(model: torch.nn.Module, key: str, read=None) -> torch.nn.Parameter | None:
    """The parameter a checkpoint key (``<module>.weight``, ``<module>.bias``, ...) names, or None."""
    stem, part = key.rsplit(".", 1)
    found = module_for_key(model, stem + ".weight", read)
    param = getattr(found[1], part, None) if found else None
    return param if isinstance(param, torch.nn.Parameter) else None


def _fingerprint(w: torch.Tensor) -> tuple:
    flat = w.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel())).long()
    return tuple(w.shape), tuple(flat[idx].double().tolist())


def _concrete(t, auto_name: str, config):
    """The model class an Auto class would pick: only concrete classes load from a state dict."""
    auto = getattr(t, auto_name)
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise VloraError(f"transformers has no {auto_name} for model type {config.model_type!r}") from None


def _config(t, folder: Path):
    try:
        return t.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise VloraError(f"{folder}: config.json cannot be read ({str(e).splitlines()[0]})") from None


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        if ckpt.is_vlora:
            return expand(path)
        return {k: ckpt.read(k) for k in ckpt.infos}
