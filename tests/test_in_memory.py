"""Models in memory as a source, and models loaded one layer at a time: the same file either way."""

import sys

import pytest
import torch

from conftest import CALIB, tiny_model
from vlora_compress import CalibConfig, VloraError, compress
from vlora_compress.io.checkpoint import ModelCheckpoint, open_checkpoint
from vlora_compress.io.models import hf, is_placeholder, load_preprocessor
from vlora_compress.pipelines.sequential import SequentialFit

PER_LAYER = dict(method="svd", ranks="uniform", calibration=CalibConfig(samples=24))


def _causal_lm(folder):
    return hf().AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


@pytest.mark.parametrize("options", [
    dict(rank=6, align=True, **PER_LAYER),  # aligned, loaded by layer from the folder, sequential fit
    dict(target_size=0.6, calibration=CalibConfig(samples=24, holdout=8)),  # the default plan, measured
], ids=["per-layer-aligned", "default-plan"])
def test_a_model_in_memory_gives_the_file_its_folder_gives_and_is_left_as_it_was(tmp_path, options):
    # one thread: the default plan weighs near-ties (fp16 against int8 at errors of 1e-7) that float
    # sums split across a loaded machine's threads can tip either way; the sources are what differ here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _same_file_either_way(tmp_path, options)
    finally:
        torch.set_num_threads(threads)


def _same_file_either_way(tmp_path, options):
    folder = tiny_model(tmp_path / "llama", "llama", tie_word_embeddings=True)
    model, tok = _causal_lm(folder), load_preprocessor(folder)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    from_memory, from_folder = tmp_path / "m.vlora.safetensors", tmp_path / "f.vlora.safetensors"
    report = compress(model, from_memory, calib=CALIB, tokenizer=tok, **options)
    compress(folder, from_folder, calib=CALIB, **options)
    assert from_memory.read_bytes() == from_folder.read_bytes()
    assert report.calibration["model_loaded"] == "whole"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, (ptr, value) in before.items():  # the very tensors, unchanged
        assert after[key].data_ptr() == ptr and torch.equal(after[key], value), key


def test_a_model_in_memory_is_seen_as_its_saved_file(tmp_path):
    """Tied weights stored once, safetensors' order and metadata, the digest of the same tensors."""
    folder = tiny_model(tmp_path / "llama", "llama", tie_word_embeddings=True)
    model = _causal_lm(folder)
    with open_checkpoint(folder) as saved:
        seen = ModelCheckpoint(model)
        assert list(seen.infos) == list(saved.infos) and "lm_head.weight" not in seen.infos
        assert [(i.dtype, i.shape) for i in seen.infos.values()] == [(i.dtype, i.shape) for i in saved.infos.values()]
        assert seen.metadata == saved.metadata and seen.nbytes == saved.nbytes
        digest = seen.sha256()
        assert digest == saved.sha256()
    with torch.no_grad():
        model.model.norm.weight[0] += 1
    assert ModelCheckpoint(model).sha256() != digest


def test_a_model_in_memory_needs_an_output_and_a_tokenizer_to_calibrate(tmp_path):
    folder = tiny_model(tmp_path / "llama", "llama")
    model = _causal_lm(folder)
    with pytest.raises(VloraError, match="needs `out`"):
        compress(model, rank=4)
    with pytest.raises(VloraError, match="needs its `tokenizer`"):
        compress(model, tmp_path / "o.vlora.safetensors", calib=CALIB, **PER_LAYER | dict(rank=4))
    assert not (tmp_path / "o.vlora.safetensors").exists()


def test_loading_by_layer_holds_one_layer_and_writes_what_loading_whole_writes(tmp_path, monkeypatch):
    """A bf16 model: its stack's weights stay placeholders until the sequential fit reaches their
    layer, never more than one layer of them at once, and the file is the one a model loaded whole
    gives."""
    folder = tiny_model(tmp_path / "llama", "llama", dtype=torch.bfloat16)
    real_at_once = []
    load = SequentialFit._load

    def counting_load(self, block):
        undo = load(self, block)
        if self.onload is None:  # loaded whole
            return undo
        stack = list(self.onload[1].values())
        real_at_once.append(sum(not is_placeholder(p) for p in stack))
        assert all(p.dtype == torch.bfloat16 for p in stack)
        return undo

    monkeypatch.setattr(SequentialFit, "_load", counting_load)
    by_layer, whole = tmp_path / "l.vlora.safetensors", tmp_path / "w.vlora.safetensors"
    report = compress(folder, by_layer, rank=6, calib=CALIB, **PER_LAYER)
    assert report.calibration["model_loaded"] == "by layer"
    assert real_at_once == [7] * 4  # q k v o gate up down of the one layer being fitted
    monkeypatch.setattr(sys.modules["vlora_compress.calibrate.original"], "load_by_layer", lambda *a, **k: None)
    report = compress(folder, whole, rank=6, calib=CALIB, **PER_LAYER)
    assert report.calibration["model_loaded"] == "whole"
    assert by_layer.read_bytes() == whole.read_bytes()
