import json

import pytest
import torch

from vlora_compress import VloraError, synthetic
from vlora_compress.io.checkpoint import open_checkpoint

SPECS = [(f"layers.{i}.w", (4, 4)) for i in range(3)]


def test_single_file_lists_lazily_in_file_order(tmp_path):
    specs = [("z.weight", (2, 2)), ("a.weight", (3,))]
    path = synthetic.write_checkpoint(tmp_path / "m.safetensors", specs, dtype=torch.float16)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.infos) == ["z.weight", "a.weight"]
        assert ckpt.infos["z.weight"].dtype == "F16" and ckpt.infos["z.weight"].nbytes == 8
        assert ckpt.metadata == {"format": "pt"}
        assert ckpt.read("a.weight").dtype == torch.float16


def test_sharded_index_reads_every_shard(llama_index):
    with open_checkpoint(llama_index) as ckpt:
        assert len(ckpt.files) == 2
        assert {i.file.name for i in ckpt.infos.values()} == {f.name for f in ckpt.files}
        assert ckpt.infos["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"


def test_folder_prefers_the_index_and_ignores_vlora_files(llama_index, tmp_path):
    (tmp_path / "other.vlora.safetensors").write_bytes(b"ignored")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.source == llama_index


def test_folder_with_several_files_and_no_index_is_ambiguous(tmp_path):
    synthetic.write_checkpoint(tmp_path / "a.safetensors", SPECS)
    synthetic.write_checkpoint(tmp_path / "b.safetensors", SPECS)
    with pytest.raises(VloraError, match="2 .safetensors files and no index"):
        open_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VloraError, match="holds no .safetensors file"):
        open_checkpoint(empty)


def test_bad_indexes(tmp_path):
    synthetic.write_checkpoint(tmp_path / "s.safetensors", SPECS)
    index = tmp_path / "m.safetensors.index.json"
    index.write_text("{oops")
    with pytest.raises(VloraError, match="not a valid JSON index"):
        open_checkpoint(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(VloraError, match="no 'weight_map'"):
        open_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"layers.0.w": "s.safetensors", "ghost": "s.safetensors"}}))
    with pytest.raises(VloraError, match="names tensor 'ghost', which this shard lacks"):
        open_checkpoint(index)


def test_checksum_covers_every_shard(llama_index):
    with open_checkpoint(llama_index) as ckpt:
        before = ckpt.sha256()
    shard = llama_index.parent / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with open_checkpoint(llama_index) as ckpt:
        assert ckpt.sha256() != before
