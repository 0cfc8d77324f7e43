import pytest
import torch

from conftest import CORE, tiny_model
from vlora_compress import compress
from vlora_compress.factored import FactoredStore, VloraLinear, factored_bytes, load_factored
from vlora_compress.models import load_model

PLANS = {
    "chain over the first layer": dict(rank=6, chunks=2, **CORE),
    "star over a mean base": dict(rank=6, chunks=2, base="mean", topology="star", bounds="equal", ranks="uniform"),
    "per-layer SVD": dict(rank=6, method="svd", ranks="uniform"),
    "a shared basis per 3 layers": dict(rank=6, chunks=2, base="none", topology="shared", ranks="uniform"),
}


def _inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("plan", PLANS)
def test_factored_model_computes_what_the_expanded_one_does(minilm_dir, tmp_path, plan):
    path = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, path, **PLANS[plan])
    dense, factored = load_model(path, minilm_dir), load_factored(path, minilm_dir)
    x = _inputs(30000)
    with torch.no_grad():
        a, b = dense(**x).last_hidden_state, factored(**x).last_hidden_state
    assert (a - b).abs().max() < 1e-3
    swapped = [m for m in factored.modules() if isinstance(m, VloraLinear)]
    assert len(swapped) == 6 * 6  # q, k, v, attention output, intermediate, output in every layer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_factored_causal_lms_match_their_expansion(tmp_path, arch):
    folder = tiny_model(tmp_path / arch, arch)
    path = tmp_path / "m.vlora.safetensors"
    compress(folder, path, rank=4, chunks=1, **CORE)
    dense, factored = load_model(path, folder), load_factored(path, folder)
    assert type(factored).__name__.endswith(("LMHeadModel", "ForCausalLM"))
    x = _inputs(256)
    with torch.no_grad():
        a, b = dense(**x).logits, factored(**x).logits
    assert (a - b).abs().max() < 1e-4
    if arch == "gpt2":  # Conv1D keeps its (in, out) weight layout
        attn = factored.transformer.h[2].attn.c_attn
        assert isinstance(attn, VloraLinear) and attn.conv1d and attn.weight.shape == (64, 192)


def test_shared_bases_are_held_once_and_memory_is_the_file(minilm_dir, tmp_path):
    path = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, path, rank=8, chunks=2, base="mean", topology="star", bounds="equal", ranks="uniform")
    factored, dense = load_factored(path, minilm_dir), load_model(path, minilm_dir)
    layers = factored.encoder.layer
    assert layers[0].output.dense.base == layers[2].output.dense.base  # one chunk, one base name
    store = factored.vlora_store
    assert isinstance(store, FactoredStore)
    names = [n for n, _ in store.items()]
    assert len(names) == len(set(names))
    # every parameter is real memory (no broadcast placeholder survives) and none is a dense weight copy
    for p in factored.parameters():
        assert p.untyped_storage().nbytes() >= p.numel() * p.element_size()
    held = factored_bytes(factored)
    file_bytes = path.stat().st_size
    assert abs(held - file_bytes) < 0.02 * file_bytes  # the header and the pooler aside
    assert held < 0.8 * factored_bytes(dense)


def test_chain_weights_sum_the_path_from_the_base(minilm_dir, tmp_path):
    path = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, path, rank=4, chunks=1, **CORE)
    f = load_factored(path, minilm_dir)
    ranks = [f.encoder.layer[i].intermediate.dense.rank for i in range(6)]
    assert ranks == [0, 4, 8, 12, 16, 20]
    dense = load_model(path, minilm_dir)
    w = f.encoder.layer[5].intermediate.dense.weight
    assert torch.allclose(w, dense.encoder.layer[5].intermediate.dense.weight, atol=1e-5)
