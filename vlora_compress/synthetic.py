"""Small synthetic checkpoints in the key layouts of real architectures, for tests and benchmarks.

Weights are seeded Gaussians (optionally with planted low-rank chains), written through the same
streaming writer as everything else, so even a multi-GB checkpoint is made one tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .io.checkpoint import DTYPE_NAMES
from .io.stacks import split_key
from .io.write import SafetensorsWriter

Spec = tuple[str, tuple[int, ...]]


def gpt2_keys(layers: int = 4, d: int = 64, vocab: int = 128, ctx: int = 32) -> list[Spec]:
    """GPT-2: Conv1D weights stored (in, out), a fused c_attn, and the old 4-D causal-mask buffer."""
    keys: list[Spec] = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(layers):
        p = f"transformer.h.{i}"
        keys += [
            (f"{p}.ln_1.weight", (d,)), (f"{p}.ln_1.bias", (d,)),
            (f"{p}.attn.bias", (1, 1, ctx, ctx)),
            (f"{p}.attn.c_attn.weight", (d, 3 * d)), (f"{p}.attn.c_attn.bias", (3 * d,)),
            (f"{p}.attn.c_proj.weight", (d, d)), (f"{p}.attn.c_proj.bias", (d,)),
            (f"{p}.ln_2.weight", (d,)), (f"{p}.ln_2.bias", (d,)),
            (f"{p}.mlp.c_fc.weight", (d, 4 * d)), (f"{p}.mlp.c_fc.bias", (4 * d,)),
            (f"{p}.mlp.c_proj.weight", (4 * d, d)), (f"{p}.mlp.c_proj.bias", (d,)),
        ]
    return keys + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def llama_keys(layers: int = 4, d: int = 64, ffn: int = 172, heads: int = 4, kv_heads: int = 2,
               vocab: int = 128) -> list[Spec]:
    """Llama: grouped-query attention (smaller k/v), a gated MLP, RMSNorm weights, untied head."""
    kv = d // heads * kv_heads
    keys: list[Spec] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}"
        keys += [
            (f"{p}.input_layernorm.weight", (d,)),
            (f"{p}.self_attn.q_proj.weight", (d, d)), (f"{p}.self_attn.k_proj.weight", (kv, d)),
            (f"{p}.self_attn.v_proj.weight", (kv, d)), (f"{p}.self_attn.o_proj.weight", (d, d)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
            (f"{p}.mlp.gate_proj.weight", (ffn, d)), (f"{p}.mlp.up_proj.weight", (ffn, d)),
            (f"{p}.mlp.down_proj.weight", (d, ffn)),
        ]
    return keys + [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def vit_keys(layers: int = 4, d: int = 48, patch: int = 4, classes: int = 10) -> list[Spec]:
    """A timm ViT: ``blocks.N``, fused qkv, a 4-D patch-embedding convolution."""
    keys: list[Spec] = [("cls_token", (1, 1, d)), ("pos_embed", (1, 17, d)),
                        ("patch_embed.proj.weight", (d, 3, patch, patch)), ("patch_embed.proj.bias", (d,))]
    for i in range(layers):
        p = f"blocks.{i}"
        keys += [
            (f"{p}.norm1.weight", (d,)), (f"{p}.norm1.bias", (d,)),
            (f"{p}.attn.qkv.weight", (3 * d, d)), (f"{p}.attn.qkv.bias", (3 * d,)),
            (f"{p}.attn.proj.weight", (d, d)), (f"{p}.attn.proj.bias", (d,)),
            (f"{p}.norm2.weight", (d,)), (f"{p}.norm2.bias", (d,)),
            (f"{p}.mlp.fc1.weight", (4 * d, d)), (f"{p}.mlp.fc1.bias", (4 * d,)),
            (f"{p}.mlp.fc2.weight", (d, 4 * d)), (f"{p}.mlp.fc2.bias", (d,)),
        ]
    return keys + [("norm.weight", (d,)), ("norm.bias", (d,)), ("head.weight", (classes, d)), ("head.bias", (classes,))]


def t5_keys(enc_layers: int = 4, dec_layers: int = 3, d: int = 32, ffn: int = 64, vocab: int = 64) -> list[Spec]:
    """Two stacks in one file: T5's ``encoder.block.N`` and ``decoder.block.N`` with sub-layer indices."""
    keys: list[Spec] = [("shared.weight", (vocab, d))]
    for side, n in (("encoder", enc_layers), ("decoder", dec_layers)):
        for i in range(n):
            p = f"{side}.block.{i}.layer"
            keys += [(f"{p}.0.SelfAttention.{m}.weight", (d, d)) for m in "qkvo"]
            keys += [(f"{p}.0.layer_norm.weight", (d,))]
            if side == "decoder":
                keys += [(f"{p}.1.EncDecAttention.{m}.weight", (d, d)) for m in "qkvo"]
            last = 2 if side == "decoder" else 1
            keys += [(f"{p}.{last}.DenseReluDense.wi.weight", (ffn, d)),
                     (f"{p}.{last}.DenseReluDense.wo.weight", (d, ffn)),
                     (f"{p}.{last}.layer_norm.weight", (d,))]
        keys += [(f"{side}.final_layer_norm.weight", (d,))]
    return keys


def gaussian(seed: int, scale: float = 0.05) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """Independent seeded weights per key: every layer far from the last, as in trained models."""
    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, key)) * 7919 + len(key))
        return torch.randn(shape, generator=g) * scale
    return make


def planted_chain(seed: int, rank: int, chunk_starts: set[int], scale: float = 0.05):
    """Weights where every stacked 2-D tensor is its predecessor plus an exact rank-``rank`` delta,
    except at ``chunk_starts`` (layer indices), where a fresh independent base begins."""
    dense = gaussian(seed, scale)
    prev: dict[str, torch.Tensor] = {}

    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        parts = split_key(key)
        if parts is None or len(shape) != 2:
            return dense(key, shape)
        prefix, layer, suffix = parts
        fam = f"{prefix}|{suffix}"
        if layer in chunk_starts or fam not in prev:
            w = dense(key, shape)
        else:
            g = torch.Generator().manual_seed(seed + 17 * layer + len(key))
            b = torch.randn(shape[0], rank, generator=g) * scale
            a = torch.randn(rank, shape[1], generator=g)
            w = prev[fam] + b @ a / rank**0.5
        prev[fam] = w
        return w

    return make


def planted_shared(seed: int, rank: int, group_of, scale: float = 0.05, noise: float = 0.02):
    """Weights where the layers of a group (``group_of(layer)``, any grouping: interleaved too) read
    one shared rank-``rank`` input subspace, ``W_l = C_l A_g``, each layer with its own
    coefficients ``C_l``, plus independent noise of ``noise`` times the weights' scale."""
    dense = gaussian(seed, scale)

    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        parts = split_key(key)
        if parts is None or len(shape) != 2:
            return dense(key, shape)
        _, layer, suffix = parts
        g = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, suffix)) * 31 + group_of(layer))
        a = torch.linalg.qr(torch.randn(shape[1], rank, generator=g)).Q.T  # orthonormal rows
        c = torch.randn(shape[0], rank, generator=torch.Generator().manual_seed(seed + len(key) * 101 + layer))
        return c @ a * scale * (shape[1] / rank) ** 0.5 + noise * dense(key, shape)

    return make


def write_checkpoint(path: str | Path, specs: list[Spec], make=None, dtype: torch.dtype = torch.float32,
                     metadata: dict[str, str] | None = None, shards: int = 1) -> Path:
    """Write ``specs`` as one file, or as ``shards`` files with a Hugging Face index beside them.

    Tensors are made in ``specs`` order (planted chains need layer order) and written one at a time.
    Returns the path to pass as a source: the file, or the index.
    """
    path = Path(path)
    make = make or gaussian(0)
    metadata = {"format": "pt"} if metadata is None else metadata
    name = DTYPE_NAMES[dtype]
    groups = [specs[i::shards] for i in range(shards)] if shards > 1 else [specs]
    if shards == 1:
        _write(path, groups[0], make, dtype, name, metadata)
        return path
    # Make tensors in spec order, but route each to its shard: write shard by shard from a cache
    # small enough for tests (sharded fixtures are small by design).
    cache = {key: make(key, shape).to(dtype) for key, shape in specs}
    stem = path.name.split(".safetensors")[0]
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        _write(path.parent / shard, group, lambda k, s: cache[k], dtype, name, metadata)
        weight_map.update({key: shard for key, _ in group})
    index = path.parent / f"{stem}.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in cache.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index


def _write(path: Path, specs: list[Spec], make, dtype, name: str, metadata) -> None:
    with SafetensorsWriter(path, [(k, name, s) for k, s in specs], metadata) as w:
        for key, tensor in _made(specs, make, dtype):
            w.write(key, tensor)


def _made(specs: list[Spec], make, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, shape in specs:
        yield key, make(key, shape).to(dtype).contiguous()


def llama_folder(folder: str | Path, layers: int = 4, d: int = 64, ffn: int = 172, heads: int = 4,
                 kv_heads: int = 2, vocab: int = 256, dtype: torch.dtype = torch.float32,
                 tokenizer_text: str | Path | None = None) -> Path:
    """A Llama model folder transformers loads offline: ``llama_keys`` weights (written one tensor
    at a time, so it may be larger than memory), its config.json and a word-level tokenizer
    trained on ``tokenizer_text`` (default: the shipped calibration text). Needs the ``hf`` extra."""
    from .io.models import hf

    t = hf()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder / "model.safetensors", llama_keys(layers, d, ffn, heads, kv_heads, vocab), dtype=dtype)
    t.LlamaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=ffn, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=2048,
                  tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."),
                  architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    word_tokenizer(folder, tokenizer_text)
    return folder


def word_tokenizer(folder: str | Path, text: str | Path | None = None, vocab: int = 250):
    """A small word-level tokenizer trained offline on ``text`` (default: the shipped calibration
    text), saved in ``folder`` as transformers saves a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .io.models import hf

    text = text or Path(__file__).resolve().parent / "data" / "austen-calibration.txt"
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(text)], trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]"]))
    fast = hf().PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)
    return fast
