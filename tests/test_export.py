"""Exports, checked by the libraries that consume them: compressed-tensors' own unpacking and
dequantization and transformers' loader, peft's adapter, gguf's block dequantization, and the GPTQ
layout read back as its kernels read it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CALIB, tiny_model
from vlora_compress import CalibConfig, compress
from vlora_compress.errors import VloraError
from vlora_compress.export import export
from vlora_compress.forms import base as forms_base
from vlora_compress.io.models import load_model
from vlora_compress.runtime.expand import expand

SMALL = CalibConfig(samples=8, max_length=32, holdout=2)
FILES = {  # name -> compress options on the tiny Llama
    "int8": dict(method="dense", quantize="int8"),
    "int4": dict(method="dense", quantize="int4", group_size=32),
    "int3": dict(method="dense", quantize="int3", group_size=32),
    "int2-midrise": dict(method="dense", quantize="int2-midrise", group_size=32),
    "q-plus-ba": dict(method="svd", base_quantize="int4", quantize="int4", group_size=32, rank=4, ranks="uniform"),
    "chain": dict(rank=4, chunks=2, base="first", topology="chain", bounds="equal", ranks="uniform", quantize="int4",
                  group_size=32),
    "shared-residual": dict(rank=4, ranks="uniform", shared=True, quantize="int4", group_size=32),
    "svd": dict(method="svd", rank=8, ranks="uniform"),
    # the MLP's families with a scale every 128 values, the attention's every 32: group sizes per
    # family, as the default plan's wider groups store them (files fixture)
    "int4-mixed-groups": dict(method="dense", quantize="int4", group_size=32),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama with a byte-level BPE tokenizer, as Llama 3, Qwen and SmolLM2 have (GGUF's "gpt2" vocab)."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tiny_model(tmp_path_factory.mktemp("export") / "llama", "llama", vocab_size=320)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CALIB.read_text().splitlines(), vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def files(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    made = {}
    for name, options in FILES.items():
        made[name] = folder / f"{name}.vlora.safetensors"
        torch.manual_seed(0)
        with pytest.MonkeyPatch.context() as mp:
            if name == "int4-mixed-groups":
                mp.setattr(forms_base, "family_plan", _mlp_in_groups_of_128)
            REPORTS[name] = compress(llama, made[name], calib=CALIB, calibration=SMALL, device="cpu", **options)
    return made


def _mlp_in_groups_of_128(fam, config, chunks, quant, base_quant=None, group_size=None):
    return PLAN_OF_FAMILY(fam, config, chunks, quant, base_quant, 128 if ".mlp." in fam.name else group_size)


PLAN_OF_FAMILY = forms_base.family_plan
REPORTS = {}  # name -> the compress report of FILES[name], filled by the files fixture


def _ids() -> dict:
    return {"input_ids": torch.randint(5, 250, (2, 12), generator=torch.Generator().manual_seed(0))}


def _stack_keys(path) -> list[str]:
    return [k for k in expand(path) if ".layers." in k and k.endswith("proj.weight")]


@pytest.mark.parametrize("name", ["int8", "int4", "int3", "int2-midrise", "int4-mixed-groups"])
def test_compressed_tensors_dequantizes_to_the_expanded_weights(name, files, llama, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    out = tmp_path / "ct"
    report = export(files[name], out, "compressed-tensors", config_dir=llama)
    assert report.layers == 28 and not report.float_layers
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    tensors = load_file(out / "model.safetensors")
    dense = expand(files[name])
    targets = {}
    for group in config["config_groups"].values():
        for t in group["targets"]:
            targets[t[4:-1].replace("[.]", ".").lstrip("^")] = group["weights"]
    assert len(targets) == 28
    if name == "int4-mixed-groups":  # the file's groups of 32 and 128, as the rows allow
        assert len({g["weights"]["group_size"] for g in config["config_groups"].values()}) > 1
    for key in _stack_keys(files[name]):
        module = key[: -len(".weight")]
        args = QuantizationArgs(**targets[module])
        shape = torch.Size(tensors[module + ".weight_shape"].tolist())
        codes = unpack_from_int32(tensors[module + ".weight_packed"], args.num_bits, shape)
        got = dequantize(codes, tensors[module + ".weight_scale"], args=args)
        assert torch.equal(got, dense[key]), (ct.__version__, key)
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" in tensors  # the rest as stored


def test_transformers_loads_the_compressed_tensors_folder_and_computes_the_expanded_model(files, llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    export(files["int4"], out, "compressed-tensors", config_dir=llama)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = load_model(files["int4"], llama)(**_ids()).logits, model(**_ids()).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_a_quantized_base_under_low_rank_exports_as_base_plus_a_peft_adapter(files, llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    report = export(files["q-plus-ba"], out, "compressed-tensors", config_dir=llama)
    assert report.adapter_layers == 28
    assert any("float32" in n and "28 tensors" in n for n in report.notes)  # one note for all, with its bytes
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == adapter["lora_alpha"] == 4
    from transformers import CompressedTensorsConfig

    # peft wraps Linear layers: transformers keeps compressed ones as its own modules unless asked to decompress
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    with torch.no_grad():
        without = base(**_ids()).logits
        model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        a, b = load_model(files["q-plus-ba"], llama)(**_ids()).logits, model(**_ids()).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert (a - without).abs().max() > 100 * (a - b).abs().max()  # the adapter is what makes it exact
    merged = model.merge_and_unload()
    dense = expand(files["q-plus-ba"])
    w = merged.model.layers[1].mlp.down_proj.weight
    assert torch.allclose(w, dense["model.layers.1.mlp.down_proj.weight"], atol=1e-6)


def _gptq_weight(tensors: dict, module: str, bits: int) -> torch.Tensor:
    """GPTQ v1 as its kernels read it: codes along the inputs, LSB first; W = s·(u − (z + 1))."""
    qweight, scales, g_idx = tensors[module + ".qweight"], tensors[module + ".scales"], tensors[module + ".g_idx"]
    words = qweight.T.contiguous().view(torch.uint8)  # (out, bytes): the little-endian stream of each output
    bitstream = ((words[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(words.shape[0], -1)
    cols = g_idx.numel()
    u = (bitstream[:, : cols * bits].reshape(-1, cols, bits).long() << torch.arange(bits)).sum(-1)
    z_words = tensors[module + ".qzeros"].contiguous().view(torch.uint8)
    z_bits = ((z_words[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(z_words.shape[0], -1)
    z = (z_bits[:, : u.shape[0] * bits].reshape(z_words.shape[0], -1, bits).long() << torch.arange(bits)).sum(-1)
    return (scales.float()[g_idx.long()].T * (u - (z[g_idx.long()].T + 1))).float()


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4), ("int3", 3), ("int2-midrise", 3),
                                       ("int4-mixed-groups", 4)])
def test_gptq_layout_reads_back_as_the_expanded_weights(name, bits, files, llama, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "gptq"
    export(files[name], out, "gptq", config_dir=llama)
    config = json.loads((out / "quantize_config.json").read_text())
    assert config["bits"] == bits and config["sym"] and config["checkpoint_format"] == "gptq"
    assert config == json.loads((out / "config.json").read_text())["quantization_config"]
    tensors, dense = load_file(out / "model.safetensors"), expand(files[name])
    for key in _stack_keys(files[name]):
        assert torch.equal(_gptq_weight(tensors, key[: -len(".weight")], bits), dense[key]), key


@pytest.mark.parametrize("name", ["int8", "int4", "int2-midrise", "q-plus-ba", "int4-mixed-groups"])
def test_gguf_blocks_dequantize_to_the_expanded_weights_in_llama_cpp_row_order(name, files, llama, tmp_path):
    gguf = pytest.importorskip("gguf")
    from vlora_compress.export.gguf import permute_rows

    out = tmp_path / "gguf"
    export(files[name], out, "gguf", config_dir=llama, pre_tokenizer="default")
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("llama.block_count").contents() == 4
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == 320 and tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]  # the rows past the vocabulary
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2" and reader.get_field("tokenizer.ggml.merges")
    dense = expand(files[name])
    kind = "Q8_0" if name == "int8" else "Q4_0"
    for i in range(4):
        for hf, gg, heads in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                              ("mlp.down_proj", "ffn_down", None)]:
            t = tensors[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type.name == kind
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            want = dense[f"model.layers.{i}.{hf}.weight"]
            if name == "q-plus-ba":  # the base alone; the increment is in the adapter
                continue
            assert torch.equal(got, permute_rows(want, heads) if heads else want), (i, hf)
    if name == "q-plus-ba":
        lora = gguf.GGUFReader(out / "adapter.gguf")
        assert lora.get_field("general.type").contents() == "adapter"
        assert lora.get_field("adapter.lora.alpha").contents() == 0.0
        names = {t.name for t in lora.tensors}
        assert "blk.0.attn_q.weight.lora_a" in names and "blk.3.ffn_down.weight.lora_b" in names


def test_forms_no_standard_format_holds_are_named_and_nothing_is_written(files, llama, tmp_path):
    out = tmp_path / "ct"
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(VloraError) as e:
            export(files["chain"], out, fmt, config_dir=llama)
        assert "model.layers.*.self_attn.q_proj.weight" in str(e.value) and "chain" in str(e.value)
        assert "transformers-remote" in str(e.value)  # where they can go
        assert not out.exists() and not list(tmp_path.glob(".ct*"))


def test_vlora_export_writes_a_folder_refuses_to_overwrite_and_says_why_in_one_line(files, llama, tmp_path, capsys):
    from vlora_compress.cli.export import export_main

    out = tmp_path / "gptq"
    with pytest.raises(SystemExit) as exc:
        export_main([str(files["int4"]), "-o", str(out), "--format", "gptq", "--config", str(llama)])
    assert exc.value.code == 0 and (out / "model.safetensors").is_file()
    for args in ([str(files["int4"]), "-o", str(out), "--format", "gptq", "--config", str(llama)],
                 [str(files["chain"]), "-o", str(tmp_path / "x"), "--format", "gptq", "--config", str(llama)],
                 [str(files["int4"]), "-o", str(tmp_path / "y"), "--format", "onnx", "--config", str(llama)]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            export_main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("name", ["chain", "shared-residual", "svd", "q-plus-ba", "int2-midrise"])
def test_transformers_remote_runs_every_form_from_the_file_without_this_package(name, files, llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from vlora_compress.runtime.factored import factored_bytes

    out = tmp_path / "remote"
    export(files[name], out, "transformers-remote", config_dir=llama)
    assert "vlora_compress" not in (out / "modeling_vlora.py").read_text().replace("vlora-compress", "")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        a, b = load_model(files[name], llama)(**_ids()).logits, model(**_ids()).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    assert factored_bytes(model) <= 1.10 * files[name].stat().st_size  # the file's tensors, each once


@pytest.mark.parametrize("name", ["int4", "int2-midrise", "q-plus-ba", "chain"])
def test_the_compress_report_lists_the_formats_that_take_each_family(name, files, llama, tmp_path):
    families = REPORTS[name].to_dict()["families"]
    assert all("transformers-remote" in f["exports"] for f in families)
    assert all(f["runtime_bytes"] == f["compressed_bytes"] for f in families)  # the packed runtime holds it as stored
    listed = {fmt for fmt in ("compressed-tensors", "gptq", "gguf") if all(fmt in f["exports"] for f in families)}
    assert listed == (set() if name == "chain" else {"compressed-tensors", "gptq", "gguf"})
    for fmt in ("compressed-tensors", "gptq", "gguf"):  # what the report lists is what export does
        if fmt in listed:
            export(files[name], tmp_path / fmt, fmt, config_dir=llama)
        else:
            with pytest.raises(VloraError):
                export(files[name], tmp_path / fmt, fmt, config_dir=llama)
