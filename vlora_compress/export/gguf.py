"""GGUF for llama.cpp: int8 layers as Q8_0, int4 and narrower as Q4_0, built block by block from the
file's own integers with the ``gguf`` package; increments as a LoRA GGUF (``adapter.gguf``).

A Q8_0 block is 32 values of one row: a float16 scale, then 32 int8 codes; Q4_0 is a float16
scale, then 16 bytes whose low nibbles hold values 0-15 and high nibbles values 16-31, each
``q + 8``. A file's int8 row repeats its one scale in every block, an int4 group of 64 or 128 its
scale in each of its blocks, and int3, int2 and the mid-rise grids (one bit wider at half the
scale) fit Q4_0's codes exactly: the values llama.cpp dequantizes are the file's. Rows must be a
multiple of 32 values and groups of 32, 64, 128...; other layers are refused by name.

llama.cpp's Llama graph expects the query and key rows of each head interleaved as the original
Meta checkpoints had them (convert_hf_to_gguf.py's ``permute``): rows move with their scales, and
the adapter's ``lora_b`` rows likewise. The adapter's ``adapter.lora.alpha`` is 0, which llama.cpp
reads as a scale of 1 for every tensor, whatever its rank: ``W = Q + B A`` exactly.

Models: Llama (``model_type`` llama) and those with its tensor names and graph. The tokenizer is
read from ``tokenizer.json`` (byte-level BPE) by gguf's own vocab readers; ``pre_tokenizer``
names llama.cpp's pre-tokenizer (e.g. ``smollm``, ``llama-bpe``), which a tokenizer file does not
say: without it llama.cpp warns and uses its default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import VloraError
from ..io.fileformat import VloraFile
from .base import ExportReport, Exporter, register, rest_of_model
from .layers import Integers, Layer, integers, regroup

ARCHS = {"llama": "llama"}  # model_type -> gguf architecture


def _gguf():
    try:
        import gguf
    except ImportError:
        raise VloraError("--format gguf needs the gguf package: pip install 'vlora-compress[export]'") from None
    return gguf


def permute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for a query or key projection: within each head, the two rotary
    halves interleaved (row 2i + j of a head is row j·d/2 + i of the original)."""
    rows = x.shape[0]
    return x.reshape(heads, 2, rows // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def blocks(ints: Integers) -> tuple[np.ndarray, str]:
    """(uint8 (rows, bytes a row), Q8_0 or Q4_0) of the codes, a float16 scale before each 32 values."""
    codes = ints.codes
    rows, cols = codes.shape
    scale = regroup(ints, 32).to(torch.float16).numpy().view(np.uint8).reshape(rows, cols // 32, 2)
    q = codes.numpy().reshape(rows, cols // 32, 32)
    if ints.bits == 8:
        return np.concatenate([scale, q.view(np.uint8)], -1).reshape(rows, -1), "Q8_0"
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    packed = u[..., :16] | (u[..., 16:] << 4)
    return np.concatenate([scale, packed], -1).reshape(rows, -1), "Q4_0"


@register
class Gguf(Exporter):
    name = "gguf"
    adapter = "gguf"

    def problems(self, layers: list[Layer], config: dict | None) -> dict[str, str]:
        out = {}
        if config is not None and config.get("model_type") not in ARCHS:
            out["model"] = f"GGUF export writes {', '.join(ARCHS)} models, not {config.get('model_type')!r}"
        for layer in layers:
            if layer.scheme == "none":
                continue
            group = layer.shape[1] if layer.scheme == "int8" else layer.group_size
            if layer.shape[1] % 32 or group % 32:
                out[layer.key] = f"Q8_0 and Q4_0 blocks are 32 values of a row; rows of {layer.shape[1]} in groups of {group} do not fill them"
        return out

    def write(self, vfile: VloraFile, layers: list[Layer], folder: Path, config_dir: Path,
              report: ExportReport, pre_tokenizer: str | None = None) -> None:
        import json

        gguf = _gguf()
        config = json.loads((config_dir / "config.json").read_text())
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
        heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        perm = {"q_proj": heads, "k_proj": kv}
        writer = gguf.GGUFWriter(folder / "model.gguf", ARCHS[config["model_type"]])
        _metadata(gguf, writer, config, config_dir, pre_tokenizer)
        kinds = set()
        rest = rest_of_model(vfile, layers, report)
        by_key = {layer.key: layer for layer in layers if layer.scheme != "none"}
        for key, _, _ in vfile.source.tensors:
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise VloraError(f"{vfile.path}: {key} has no llama.cpp tensor name")
            heads_of = perm.get(key.rsplit(".", 2)[-2]) if key.endswith(".weight") else None
            if key in by_key:
                ints = integers(vfile, by_key[key])
                if heads_of:
                    ints = Integers(permute_rows(ints.codes, heads_of), permute_rows(ints.scale, heads_of),
                                    ints.bits, ints.group_size, ints.widened)
                data, kind = blocks(ints)
                kinds.add(kind)
                layer = by_key[key]
                stored = sum(vfile.checkpoint.infos[n].nbytes for n in (layer.base, layer.base + ".scale"))
                if data.nbytes != stored:
                    report.note(f"{layer.scheme} (groups of {layer.group_size}) as {kind}: 32-value blocks, a scale "
                                "each", key, int(data.nbytes) - stored)
                writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            else:
                t = rest[key]
                if heads_of:
                    t = permute_rows(t, heads_of)
                keep16 = t.dtype == torch.float16 and t.dim() > 1
                writer.add_tensor(name, t.to(torch.float16 if keep16 else torch.float32).numpy())
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if "Q4_0" in kinds else
                             gguf.LlamaFileType.MOSTLY_Q8_0 if kinds else gguf.LlamaFileType.ALL_F32)
        _close(writer)
        if report.adapter_layers:
            _adapter(gguf, vfile, layers, folder / "adapter.gguf", config, names, perm)


def _metadata(gguf, writer, config: dict, config_dir: Path, pre_tokenizer: str | None) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_type("model")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if (config_dir / "tokenizer.json").is_file():
        try:
            vocab = gguf.vocab.BpeVocab(config_dir)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise VloraError(f"{config_dir}: gguf cannot read its tokenizer as byte-level BPE ({e})") from None
        tokens, types = [], []
        for text, _, kind in vocab.all_tokens():
            tokens.append(text if isinstance(text, str) else text.decode("utf-8", "replace"))
            types.append(int(kind))
        for i in range(len(tokens), config["vocab_size"]):  # rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        writer.add_tokenizer_model("gpt2")
        if pre_tokenizer:
            writer.add_tokenizer_pre(pre_tokenizer)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.vocab.SpecialVocab(config_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _close(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _adapter(gguf, vfile: VloraFile, layers: list[Layer], path: Path, config: dict, names, perm: dict) -> None:
    from .peft import adapter_tensors

    writer = gguf.GGUFWriter(path, ARCHS[config["model_type"]])
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)  # no alpha: a scale of 1 for every rank
    for module, (b, a) in adapter_tensors(vfile, layers).items():
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        heads = perm.get(module.rsplit(".", 1)[-1])
        writer.add_tensor(name + ".lora_a", a.numpy())
        writer.add_tensor(name + ".lora_b", (permute_rows(b, heads) if heads else b).contiguous().numpy())
    _close(writer)
