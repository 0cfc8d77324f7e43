import json
import math
import shutil

import pytest
import torch

from conftest import CALIB, CORE, EVAL, tiny_model
from vlora_compress import VloraError, compress, run
from vlora_compress.calibrate.grams import CalibConfig
from vlora_compress.cli.app import eval_main
from vlora_compress.evaluate.scoring import EvalConfig, evaluate
from vlora_compress.io.models import load_model, load_preprocessor


def test_embedding_full_rank_matches_and_low_rank_drops(minilm_dir, tmp_path):
    full, low = tmp_path / "full.vlora.safetensors", tmp_path / "low.vlora.safetensors"
    compress(minilm_dir, full, rank=384, chunks=2, **CORE)
    compress(minilm_dir, low, rank=4, chunks=3, **CORE)
    cfg = EvalConfig(task="embedding", samples=40)
    same = evaluate(full, EVAL, cfg, reference=minilm_dir)
    assert same.metric("cosine_to_reference").model == pytest.approx(1.0, abs=1e-5)
    worse = evaluate(low, EVAL, cfg, reference=minilm_dir)
    m = worse.metric("cosine_to_reference")
    assert m.model < 0.5 and m.drop == pytest.approx(1 - m.model)
    assert evaluate(low, EVAL, cfg, reference=minilm_dir).to_dict() == worse.to_dict()  # deterministic


def test_embedding_pairs_add_spearman(minilm_dir, tmp_path):
    lines = [line for line in EVAL.read_text().splitlines() if line.strip()][:30]
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(15):
            # a sentence against itself scores 5, against a far one 0
            a, b = lines[i], (lines[i] if i % 2 else lines[29 - i])
            f.write(json.dumps({"sentence1": a, "sentence2": b, "score": 5.0 if i % 2 else 0.0}) + "\n")
    r = evaluate(minilm_dir, pairs, EvalConfig(task="embedding"), reference=minilm_dir)
    rho = r.metric("spearman")
    assert rho.model == pytest.approx(rho.reference) and rho.model > 0.8
    assert r.samples == 15


def test_perplexity_matches_the_model_loss_and_strides(tiny_gpt2, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(EVAL.read_text().split()[:20]))
    r = evaluate(tiny_gpt2, text, EvalConfig(task="perplexity", max_length=64))
    model, tok = load_model(tiny_gpt2), load_preprocessor(tiny_gpt2)
    ids = tok(text.read_text(), return_tensors="pt")["input_ids"]
    assert ids.shape[1] < 64
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert r.metric("perplexity").model == pytest.approx(math.exp(float(loss)), rel=1e-4)
    long = evaluate(tiny_gpt2, EVAL, EvalConfig(task="perplexity", max_length=32, samples=8), reference=tiny_gpt2)
    m = long.metric("perplexity")
    assert long.samples == 8 * 32 and m.drop == pytest.approx(0.0) and 50 < m.model < 1000


def test_logits_kl_and_agreement(tiny_gpt2, tmp_path):
    out = tmp_path / "g.vlora.safetensors"
    compress(tiny_gpt2, out, rank=2, chunks=1)
    cfg = EvalConfig(task="logits", samples=16)
    r = evaluate(out, EVAL, cfg, reference=tiny_gpt2)
    assert r.metric("kl_to_reference").model > 1e-4 and r.metric("top1_agreement").model < 1.0
    same = evaluate(tiny_gpt2, EVAL, cfg, reference=tiny_gpt2)
    assert same.metric("kl_to_reference").model == pytest.approx(0.0, abs=1e-6)
    assert same.metric("top1_agreement").model == 1.0
    with pytest.raises(VloraError, match="add `reference`"):
        evaluate(out, EVAL, cfg, config_dir=tiny_gpt2)


def test_classification_from_jsonl_and_csv(tmp_path):
    folder = tiny_model(tmp_path / "cls", "bert-classifier")
    lines = [line for line in EVAL.read_text().splitlines() if line.strip()][:20]
    jsonl, csv = tmp_path / "l.jsonl", tmp_path / "l.csv"
    jsonl.write_text("".join(json.dumps({"text": t, "label": ["calm", "lively"][i % 2]}) + "\n"
                             for i, t in enumerate(lines)))
    csv.write_text("text,label\n" + "".join(f"\"{t.replace(chr(34), '')}\",{i % 2}\n" for i, t in enumerate(lines)))
    out = tmp_path / "c.vlora.safetensors"
    compress(folder, out, rank=2, chunks=1)
    for data in (jsonl, csv):
        r = evaluate(out, data, EvalConfig(task="classification"), reference=folder)
        acc = r.metric("accuracy")
        assert 0 <= acc.model <= 1 and 0 <= acc.reference <= 1 and r.samples == 20
        assert 0 <= r.metric("agreement_with_reference").model <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "furious"}) + "\n")
    with pytest.raises(VloraError, match="label 'furious' is not one of the model's labels"):
        evaluate(folder, bad, EvalConfig(task="classification"))


def test_bad_eval_input(minilm_dir, gpt2_file, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(VloraError, match="holds no text"):
        evaluate(minilm_dir, empty, EvalConfig(), reference=minilm_dir)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    with pytest.raises(VloraError, match="holds images, but this model takes text"):
        evaluate(minilm_dir, imgs, EvalConfig(), reference=minilm_dir)
    no_config = tmp_path / "bare"
    no_config.mkdir()
    shutil.copy(minilm_dir / "model.safetensors", no_config / "model.safetensors")
    with pytest.raises(VloraError, match="has no config.json"):
        evaluate(no_config, EVAL, EvalConfig(), reference=minilm_dir)
    other = tmp_path / "gpt2.vlora.safetensors"
    compress(gpt2_file, other, rank=2)
    with pytest.raises(VloraError, match="does not match the config"):
        evaluate(other, EVAL, EvalConfig(samples=4), reference=minilm_dir, config_dir=minilm_dir)
    with pytest.raises(VloraError, match="`eval.task` must be one of"):
        EvalConfig(task="bleu")


def test_vlora_eval_cli_json_and_one_line_errors(minilm_dir, tmp_path, capsys):
    v = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, v, rank=8, chunks=2, **CORE)
    with pytest.raises(SystemExit) as exc:
        eval_main([str(v), "--data", str(EVAL), "--reference", str(minilm_dir), "--samples", "8", "--json"])
    out, _ = capsys.readouterr()
    assert exc.value.code == 0
    report = json.loads(out)
    assert report["task"] == "embedding" and report["metrics"][0]["name"] == "cosine_to_reference"
    with pytest.raises(SystemExit) as exc:
        eval_main([str(v), "--data", str(tmp_path / "none.txt"), "--reference", str(minilm_dir)])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "no such file" in err


def test_compress_eval_puts_figures_in_the_report(minilm_dir, tmp_path):
    report = run(minilm_dir, tmp_path / "m.vlora.safetensors", method="svd", ranks="uniform", target_size=0.5,
                      target_of="stack", calib=CALIB, calibration=CalibConfig(samples=64), eval_data=EVAL,
                      eval_config=EvalConfig(task="embedding", samples=16))
    assert report.rank == 128 and report.stack_size_ratio == pytest.approx(0.5, abs=0.01)
    assert report.evaluation["metrics"][0]["name"] == "cosine_to_reference"
    assert 0.5 < report.evaluation["metrics"][0]["model"] < 1


def _images(folder, n=12):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        label = ["dark", "light"][i % 2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        base = 40 if label == "dark" else 200
        pixels = (base + 30 * torch.rand(16, 16, 3, generator=g)).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder


def test_image_classifier_calibrates_and_evaluates_on_an_image_folder(tmp_path):
    import numpy as np

    model_dir = tiny_model(tmp_path / "vit", "vit-classifier")
    images = _images(tmp_path / "images")
    npz = tmp_path / "calib.npz"
    np.savez(npz, images=np.stack([np.full((16, 16, 3), v, dtype=np.uint8) for v in range(0, 240, 10)]))
    out = tmp_path / "v.vlora.safetensors"
    report = compress(model_dir, out, rank=4, chunks=1, calib=npz, calibration=CalibConfig(holdout=4))
    assert report.calibration["samples"] == 20 and report.calibration["whitened_layers"] > 0
    r = evaluate(out, images, EvalConfig(task="classification"), reference=model_dir)
    assert r.samples == 12 and 0 <= r.metric("accuracy").model <= 1
    same = evaluate(model_dir, images, EvalConfig(task="classification"), reference=model_dir)
    assert same.metric("agreement_with_reference").model == 1.0
    with pytest.raises(VloraError, match="holds text, but this model takes images"):
        compress(model_dir, tmp_path / "x.vlora.safetensors", calib=EVAL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_perplexity_rises_when_a_causal_lm_is_compressed(tmp_path, arch):
    folder = tiny_model(tmp_path / arch, arch)
    out = tmp_path / "c.vlora.safetensors"
    compress(folder, out, rank=1, chunks=1)
    r = evaluate(out, EVAL, EvalConfig(task="perplexity", samples=4, max_length=32), reference=folder)
    m = r.metric("perplexity")
    assert m.model != m.reference and math.isfinite(m.model)
