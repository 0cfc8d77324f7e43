import pytest
import torch

from conftest import CALIB, CORE
from vlora_compress import VloraError, compress
from vlora_compress.calibrate.grams import CalibConfig, calibrate
from vlora_compress.fit.svd import truncated_svd, whitened_svd
from vlora_compress.io.models import load_model, load_preprocessor, module_for_key


def _keys(layers, names, prefix):
    return [f"{prefix}.{i}.{n}.weight" for i in layers for n in names]


def test_minilm_grams_share_inputs_only_within_a_layer(minilm_dir):
    model, tok = load_model(minilm_dir, head="base"), load_preprocessor(minilm_dir)
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    keys = _keys(range(6), names, "encoder.layer")
    grams = calibrate(model, tok, CALIB, keys, CalibConfig(samples=48, batch_size=16))
    assert grams.samples == 48
    # q, k and v read one tensor: one Gram; nothing else is shared, although every block's
    # activations have the same shape and reuse freed memory
    assert grams.alias == {f"encoder.layer.{i}.attention.self.{n}.weight": f"encoder.layer.{i}.attention.self.query.weight"
                           for i in range(6) for n in ("key", "value")}
    g0, g1 = grams.gram("encoder.layer.0.attention.self.query.weight"), grams.gram("encoder.layer.1.attention.self.query.weight")
    assert not torch.allclose(g0, g1)
    assert grams.gram("encoder.layer.0.output.dense.weight").shape == (1536, 1536)
    for g in grams.grams.values():
        assert g.dtype == torch.float64 and torch.allclose(g, g.T)
        assert torch.linalg.eigvalsh(g).min() > -1e-6 * g.diagonal().max()
    enc = tok([line for line in CALIB.read_text().splitlines() if line.strip()][:48], padding=True, truncation=True,
              max_length=128, return_tensors="pt")
    assert grams.tokens == int(enc["attention_mask"].sum())  # padding is left out
    # the Gram's trace is the sum of squared inputs over real tokens
    captured = []
    h = model.encoder.layer[3].intermediate.dense.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(**enc)
    h.remove()
    x = captured[0][enc["attention_mask"].bool()].double()
    assert torch.allclose(grams.gram("encoder.layer.3.intermediate.dense.weight").trace(), x.square().sum(), rtol=1e-6)


def test_gpt2_conv1d_whitening_lowers_the_true_output_error(tiny_gpt2):
    model, tok = load_model(tiny_gpt2, head="base"), load_preprocessor(tiny_gpt2)
    key = "transformer.h.1.attn.c_proj.weight"  # square (in, out): a wrong orientation would not crash
    grams = calibrate(model, tok, CALIB, [key, "transformer.h.1.attn.c_attn.weight"], CalibConfig(samples=64))
    assert grams.side[key] == 0 and grams.side["transformer.h.1.attn.c_attn.weight"] == 0
    _, module = module_for_key(model, key)
    captured = []
    h = module.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    texts = [line for line in CALIB.read_text().splitlines() if line.strip()][500:564]  # held out
    with torch.no_grad():
        model(**tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    h.remove()
    x = torch.cat(captured).double()
    w = module.weight.detach()
    err = lambda b, a: float(torch.linalg.norm(x @ (w.double() - (b @ a).double())) / torch.linalg.norm(x @ w.double()))  # noqa: E731
    plain = err(*truncated_svd(w, 8))
    whitened = err(*whitened_svd(w, 8, grams.whitener(key)))
    assert whitened < 0.9 * plain


def test_calibrated_vlora_beats_data_free_on_the_real_model(minilm_dir, tmp_path):
    from conftest import EVAL
    from vlora_compress.evaluate.scoring import EvalConfig, evaluate

    scores = {}
    for name, calib in (("plain", None), ("whitened", CALIB)):
        out = tmp_path / f"{name}.vlora.safetensors"
        report = compress(minilm_dir, out, rank=64, chunks=2, calib=calib, calibration=CalibConfig(samples=64), **CORE)
        if calib:
            assert report.calibration["whitened_layers"] == 36 and report.calibration["data_free_layers"] == []
            assert all(t["out_error"] is not None for t in report.tensors)
        e = evaluate(out, EVAL, EvalConfig(task="embedding", samples=64), reference=minilm_dir, config_dir=minilm_dir)
        scores[name] = e.metric("cosine_to_reference").model
    assert scores["whitened"] > scores["plain"] + 0.1


def test_llama_calibration_reaches_every_projection(tiny_llama):
    model, tok = load_model(tiny_llama, head="base"), load_preprocessor(tiny_llama)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    keys = _keys(range(4), names, "model.layers")
    grams = calibrate(model, tok, CALIB, keys, CalibConfig(samples=16))
    assert all(k in grams for k in keys)
    assert grams.alias["model.layers.2.mlp.up_proj.weight"] == "model.layers.2.mlp.gate_proj.weight"
    assert grams.gram("model.layers.2.mlp.down_proj.weight").shape == (128, 128)


def test_calibration_refuses_the_wrong_data(minilm_dir, tmp_path):
    model, tok = load_model(minilm_dir, head="base"), load_preprocessor(minilm_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(VloraError, match="holds no text"):
        calibrate(model, tok, empty, ["encoder.layer.0.intermediate.dense.weight"])
    images = tmp_path / "imgs"
    images.mkdir()
    with pytest.raises(VloraError, match="holds images, but this model takes text"):
        calibrate(model, tok, images, ["encoder.layer.0.intermediate.dense.weight"])
    with pytest.raises(VloraError, match="none of the factorised weights"):
        calibrate(model, tok, CALIB, ["embeddings.word_embeddings.weight"])


def test_grams_in_fp32_or_on_disk_match_fp64_in_memory(tiny_llama, tmp_path):
    model, tok = load_model(tiny_llama, head="base"), load_preprocessor(tiny_llama)
    keys = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    ref = calibrate(model, tok, CALIB, keys, CalibConfig(samples=40, batch_size=8))
    small = calibrate(model, tok, CALIB, keys, CalibConfig(samples=40, batch_size=8, gram_dtype="fp32"))
    folder = tmp_path / "grams"
    folder.mkdir()
    disk = calibrate(model, tok, CALIB, keys, CalibConfig(samples=40, batch_size=8, gram_dir=folder))
    assert sorted(p.name for p in folder.iterdir()) == sorted(k + ".gram" for k in keys)
    for k in keys:
        assert small.gram(k).dtype == torch.float32
        assert torch.allclose(small.gram(k).double(), ref.gram(k), rtol=1e-5, atol=1e-6 * float(ref.gram(k).abs().max()))
        assert torch.equal(disk.gram(k), ref.gram(k))
    assert ref.nbytes == 2 * small.nbytes
    with pytest.raises(VloraError, match="`calibration.gram_dtype`"):
        CalibConfig(gram_dtype="fp8")


def test_a_causal_lm_is_calibrated_on_windows_of_running_text_and_an_encoder_on_lines(tiny_llama, minilm_dir,
                                                                                         tmp_path):
    """auto packing: a causal LM reads the calibration text run together and cut every max_length
    tokens (the contexts it is evaluated on), an encoder reads one sample per line; either can be
    asked for, and the report says which was used."""
    from vlora_compress.calibrate.grams import read_calibration

    tok = load_preprocessor(tiny_llama)
    lines = [line.strip() for line in CALIB.read_text().splitlines() if line.strip()]
    config = CalibConfig(samples=6, holdout=2, max_length=40)
    samples, held = read_calibration(tok, CALIB, config, causal=True)
    assert len(samples) == 6 and len(held) == 2
    ids = tok("\n".join(lines), add_special_tokens=False)["input_ids"]
    for n, text in enumerate(samples + held):  # consecutive windows of 40 tokens, in the text's order
        assert tok(text, add_special_tokens=False)["input_ids"] == ids[40 * n: 40 * (n + 1)]
    assert read_calibration(tok, CALIB, config, causal=False) == (lines[:6], lines[6:8])
    assert read_calibration(tok, CALIB, CalibConfig(samples=6, holdout=2, packing="lines"), causal=True)[0] == lines[:6]
    given = ["one two three", "four five"]  # a list in memory is run together the same way
    assert read_calibration(tok, given, CalibConfig(samples=4, holdout=0, max_length=3), causal=True)[0] == \
        [tok.decode(tok("one two three\nfour five", add_special_tokens=False)["input_ids"][i:i + 3]) for i in (0, 3)]

    report = compress(tiny_llama, tmp_path / "l.vlora.safetensors", rank=4, calib=CALIB, method="svd",
                      ranks="uniform", calibration=CalibConfig(samples=6, holdout=0, max_length=40))
    assert report.calibration["packing"] == "windows of 40 tokens"
    assert report.calibration["samples"] == 6 and report.calibration["tokens"] >= 6 * 40
    assert "6 samples (windows of 40 tokens)" in report.to_markdown()
    report = compress(minilm_dir, tmp_path / "m.vlora.safetensors", rank=4, calib=CALIB, method="svd",
                      ranks="uniform", calibration=CalibConfig(samples=6, holdout=0))
    assert report.calibration["packing"] == "lines"
    with pytest.raises(VloraError, match="packing"):
        CalibConfig(packing="pages")


def test_held_back_samples_can_come_from_other_text_and_the_planner_measures_on_them(minilm_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """--holdout-data: the Grams take the calibration file's first samples, all of them, and the
    samples every candidate plan is measured on are the other file's first ones; the report records
    which. A missing file is one line and exit 2, and no output is written."""
    import importlib

    comp = importlib.import_module("vlora_compress.pipelines.registry")  # where the pipelines make the meter
    from conftest import EVAL
    from vlora_compress.calibrate.grams import read_calibration
    from vlora_compress.cli.app import compress_main

    tok = load_preprocessor(minilm_dir)
    lines = lambda path: [x.strip() for x in path.read_text().splitlines() if x.strip()]  # noqa: E731
    samples, held = read_calibration(tok, CALIB, CalibConfig(samples=6, holdout=3, holdout_data=EVAL))
    assert samples == lines(CALIB)[:6] and held == lines(EVAL)[:3]
    measured = []
    meter = comp.OutputMeter

    def spy(model, preprocessor, held, *args, **kwargs):
        measured.append(list(held))
        return meter(model, preprocessor, held, *args, **kwargs)

    monkeypatch.setattr(comp, "OutputMeter", spy)
    out = tmp_path / "m.vlora.safetensors"
    report = compress(minilm_dir, out, rank=4, ranks="uniform", calib=CALIB,
                      calibration=CalibConfig(samples=8, holdout=4, holdout_data=EVAL))
    assert measured == [lines(EVAL)[:4]] and report.calibration["samples"] == 8
    assert report.calibration["holdout_data"] == str(EVAL)
    with pytest.raises(SystemExit) as exc:
        compress_main([str(minilm_dir), "--calib", str(CALIB), "--holdout-data", str(tmp_path / "none.txt"),
                       "-o", str(tmp_path / "x.vlora.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "none.txt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.vlora.safetensors").exists()


def _texts(n: int) -> list[str]:
    return [x.strip() for x in CALIB.read_text().splitlines() if x.strip()][:n]


def test_a_causal_lm_is_measured_by_next_token_kl_from_the_original(tiny_llama):
    """measure logits: with the reference's every token kept it is the exact mean KL of the next-token
    distributions over real tokens (fewer kept: tests/test_kl.py), and the original itself measures 0."""
    from vlora_compress.calibrate.grams import OutputMeter

    lm, tok = load_model(tiny_llama, head="causal-lm"), load_preprocessor(tiny_llama)
    lm.lm_head.weight.data *= 30  # peaked next-token distributions, as a trained LM's (a random one's are flat)
    texts = _texts(6)
    key = "model.layers.1.mlp.down_proj.weight"
    w = lm.model.layers[1].mlp.down_proj.weight.detach().clone()
    torch.manual_seed(1)
    bent = {key: w + 0.5 * w.std() * torch.randn_like(w)}

    def exact_kl():
        enc = tok(texts, padding=True, return_tensors="pt")
        mask = enc["attention_mask"].bool()
        with torch.no_grad():
            p = torch.log_softmax(lm(**enc).logits.double(), -1)[mask]
            lm.model.layers[1].mlp.down_proj.weight.data = bent[key]
            q = torch.log_softmax(lm(**enc).logits.double(), -1)[mask]
            lm.model.layers[1].mlp.down_proj.weight.data = w
        return float((p.exp() * (p - q)).sum(-1).mean())

    meter = OutputMeter(lm, tok, texts, 64, measure="logits", batch_size=4)
    assert meter.name == "logits" and meter({}) == pytest.approx(0, abs=1e-9)
    want = exact_kl()
    assert want > 1e-3 and meter(bent) == pytest.approx(want, rel=1e-4)  # 256 tokens: the whole vocabulary
    assert torch.equal(lm.model.layers[1].mlp.down_proj.weight, w)  # the weights are put back


def test_a_model_without_a_head_is_measured_by_its_pooled_embeddings(minilm_dir):
    """measure embedding: the mean of 1 - cosine between pooled sentence embeddings, as vlora-eval
    scores an embedding model; the hidden-state measure of the same change is another number."""
    from vlora_compress.calibrate.grams import OutputMeter
    from vlora_compress.io.models import pooled_embedding

    model, tok = load_model(minilm_dir, head="base"), load_preprocessor(minilm_dir)
    texts = _texts(8)
    key = "encoder.layer.2.intermediate.dense.weight"
    module = module_for_key(model, key)[1]
    w = module.weight.detach().clone()
    bent = {key: truncated_svd(w, 8)[0] @ truncated_svd(w, 8)[1]}
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        e0 = pooled_embedding(model(**enc), enc["attention_mask"])
        module.weight.data = bent[key]
        e1 = pooled_embedding(model(**enc), enc["attention_mask"])
        module.weight.data = w
    want = float(1 - (e0 * e1).sum(-1).mean())
    meter = OutputMeter(model, tok, texts, 64, measure="embedding", batch_size=3)
    assert meter.name == "embedding" and want > 1e-3
    assert meter(bent) == pytest.approx(want, rel=1e-4)
    assert OutputMeter(model, tok, texts, 64)(bent) != pytest.approx(want, rel=0.1)


def test_plans_are_measured_by_what_the_model_is_scored_by_unless_told(tiny_llama, tmp_path, capsys):
    """auto: a causal LM's decisions are next-token KL (its head loaded with it), --measure hidden
    gives the final hidden states; logits on a model without a language-model head is one line and
    exit 2, with nothing written."""
    from vlora_compress.cli.app import compress_main

    def measures(**calibration):
        report = compress(tiny_llama, tmp_path / "l.vlora.safetensors", target_size="0.6", calib=CALIB, force=True,
                          calibration=CalibConfig(samples=24, holdout=6, **calibration))
        return {d["measure"] for d in report.decisions}

    assert measures() == {"logits"}
    assert measures(measure="hidden") == {"model"}
    with pytest.raises(VloraError, match="measure"):
        CalibConfig(measure="vibes")
    from conftest import tiny_model

    bert = tiny_model(tmp_path / "bert", "bert-classifier")
    out = tmp_path / "b.vlora.safetensors"
    with pytest.raises(SystemExit) as exc:
        compress_main([str(bert), "--calib", str(CALIB), "--calib-samples", "16", "--target-size", "0.6",
                       "--measure", "logits", "-o", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--measure" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_plan_that_is_not_measured_holds_nothing_back(tiny_llama, tmp_path):
    """GPTQ alone (--method dense) or a given rank: no plan is measured, so every calibration
    sample goes into the Grams, even where the data is too short for samples + holdout (which
    keeps at least half for the Grams and holds the rest back for a measured plan)."""
    given = [line.strip() for line in CALIB.read_text().splitlines() if line.strip()][:10]
    config = CalibConfig(samples=16, holdout=8, packing="lines")
    for options in (dict(method="dense", quantize="int4", group_size=16), dict(method="svd", rank=4, ranks="uniform")):
        report = compress(tiny_llama, tmp_path / "a.vlora.safetensors", calib=given, calibration=config, force=True,
                          **options)
        assert report.calibration["samples"] == 10 and report.calibration["holdout_samples"] == 0, options
    measured = compress(tiny_llama, tmp_path / "b.vlora.safetensors", calib=given, calibration=config,
                        method="svd", target_size=0.6)  # measured ranks: half held back
    assert measured.calibration["samples"] == 5 and measured.calibration["holdout_samples"] == 5
