"""Block-sequential calibration and fitting: the same math as the classic path, a layer at a time."""

import pytest
import torch

from conftest import CALIB, EVAL, hidden_error, tiny_model
from vlora_compress import CalibConfig, compress, expand
from vlora_compress.calibrate.grams import OutputMeter, read_calibration
from vlora_compress.io.models import load_model, load_preprocessor, module_for_key

PER_LAYER = dict(method="svd", ranks="uniform")


def swap_weights(model, tensors: dict) -> dict:
    """Put checkpoint tensors into the model's linear layers; returns what was there, to put back."""
    old = {}
    for key, value in tensors.items():
        module = module_for_key(model, key)[1]
        old[key] = module.weight.data
        module.weight.data = value.to(module.weight.dtype)
    return old


def test_without_feedback_it_fits_what_the_classic_path_fits(tiny_llama, tmp_path):
    """feedback none: every Gram from the original activations, a layer at a time; the file is the
    classic path's up to float rounding of the Grams, and only one layer's Grams are held."""
    calib = CalibConfig(samples=48)
    files = {}
    for sequential in (False, True):
        files[sequential] = tmp_path / f"{sequential}.vlora.safetensors"
        report = compress(tiny_llama, files[sequential], rank=6, calib=CALIB, calibration=calib, sequential=sequential,
                          feedback="none", **PER_LAYER)
        assert report.calibration["sequential_layers"] == (28 if sequential else 0)
        assert report.calibration["whitened_layers"] == 28
        if sequential:
            assert report.calibration["gram_bytes"] * 2 < classic_gram_bytes  # one layer of four
        else:
            classic_gram_bytes = report.calibration["gram_bytes"]
    a, b = expand(files[False]), expand(files[True])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key


def test_output_feedback_undoes_upstream_error_where_data_suffices(tmp_path):
    """With far more calibration tokens than a layer has inputs (600 sentences for inputs of 64 and
    128 dims), fitting each layer to the original's outputs from the compressed model's inputs
    lowers the final error on held-out text (measured 0.239 against 0.257). Whitening by the
    compressed inputs alone fits each layer for what it is fed, not for the original's outputs: on
    this random model that costs a little (0.299 against 0.257); on SmolLM2 it is the one that pays
    (bench/llm.py, docs/calibration.md). Measured on lines (600 sentences); packed in windows the
    same text gives fewer, longer samples."""
    folder = tiny_model(tmp_path / "llama", "llama", num_hidden_layers=4)
    tok = load_preprocessor(folder)
    held, _ = read_calibration(tok, EVAL, CalibConfig(samples=64, holdout=0))
    errors = {}
    for feedback in ("none", "inputs", "outputs"):
        path = tmp_path / f"{feedback}.vlora.safetensors"
        compress(folder, path, rank=8, calib=CALIB, calibration=CalibConfig(samples=600, packing="lines"),
                 feedback=feedback,
                 **PER_LAYER)
        errors[feedback] = hidden_error(folder, path, held)
    assert errors["outputs"] < 0.95 * errors["none"], errors
    assert errors["inputs"] < 1.25 * errors["none"], errors  # a working fit, not a broken one


def test_input_feedback_whitens_each_weight_by_what_the_compressed_weights_before_it_give(tiny_llama, tmp_path,
                                                                                        monkeypatch):
    """Within a layer too: o_proj's Gram is taken after q, k and v are fitted, down_proj's after
    gate and up; so each equals the Gram of the model with every weight before it compressed."""
    import vlora_compress.pipelines.sequential as seq
    from vlora_compress.calibrate.grams import calibrate

    seen: dict[str, torch.Tensor] = {}
    init = seq._Layer.__init__

    def spy(self, modules, grams, alias, damping):
        seen.update(grams)
        init(self, modules, grams, alias, damping)

    monkeypatch.setattr(seq._Layer, "__init__", spy)
    path = tmp_path / "f.vlora.safetensors"
    config = CalibConfig(samples=12, holdout=0)
    compress(tiny_llama, path, rank=4, calib=CALIB, calibration=config, **PER_LAYER)
    fitted = expand(path)
    model, tok = load_model(tiny_llama, head="base"), load_preprocessor(tiny_llama)
    samples, _ = read_calibration(tok, CALIB, config, causal=True)
    o, down = "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"
    before = {o: ["model.layers.0.", "model.layers.1.self_attn.q", "model.layers.1.self_attn.k",
                  "model.layers.1.self_attn.v"],
              down: ["model.layers.0.", "model.layers.1.self_attn", "model.layers.1.mlp.gate", "model.layers.1.mlp.up"]}
    for key, prefixes in before.items():
        original = calibrate(model, tok, samples, [key], config).gram(key)
        old = swap_weights(model, {k: v for k, v in fitted.items()
                                   if k.startswith(tuple(prefixes)) and k.endswith("proj.weight")})
        compressed = calibrate(model, tok, samples, [key], config).gram(key)
        swap_weights(model, old)
        assert torch.allclose(seen[key], compressed, rtol=1e-4, atol=1e-6), key
        assert not torch.allclose(seen[key], original, rtol=1e-2), key


def test_conv1d_and_planned_families_take_the_sequential_path_or_the_classic_one(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D weights (stored in x out) fit sequentially too; planned on the model, a family
    given a whitened-mean base is fitted after the pass, from the original model's Grams."""
    path = tmp_path / "g.vlora.safetensors"
    report = compress(tiny_gpt2, path, rank=8, chunks=2, base="mean", topology="star", bounds="equal",
                      ranks="uniform", calib=CALIB, calibration=CalibConfig(samples=32), feedback="outputs",
                      planning="model")
    assert report.calibration["sequential_layers"] == 0 and report.calibration["whitened_layers"] == 16
    report = compress(tiny_gpt2, path, rank=8, calib=CALIB, calibration=CalibConfig(samples=32), feedback="outputs",
                      force=True, **PER_LAYER)
    assert report.calibration["sequential_layers"] == 16 and report.calibration["feedback"] == "outputs"
    model, tok = load_model(tiny_gpt2, head="base"), load_preprocessor(tiny_gpt2)
    texts, _ = read_calibration(tok, EVAL, CalibConfig(samples=8, holdout=0))
    meter = OutputMeter(model, tok, texts, 64)
    fitted = {k: v for k, v in expand(path).items() if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))}
    assert 0 < meter(fitted) < 0.5  # a working model, not a broken one


def test_a_shared_basis_comes_from_the_original_grams_and_each_layer_fits_its_coefficients_to_its_stream(
        tiny_llama, tmp_path, monkeypatch):
    """The basis is made at the group's first layer from the original model's weights and Grams (as
    fitting at once makes it); each layer's coefficients are then the least-squares best over it,
    whitened by the inputs the compressed layers before it feed it."""
    import vlora_compress.pipelines.sequential as seq
    from safetensors import safe_open
    from vlora_compress.fit.factorise import coefficients
    from vlora_compress.fit.svd import Whitener

    seen: dict[str, torch.Tensor] = {}
    init = seq._Layer.__init__

    def spy(self, modules, grams, alias, damping):
        seen.update({key: grams[alias.get(key, key)] for key in modules})
        init(self, modules, grams, alias, damping)

    monkeypatch.setattr(seq._Layer, "__init__", spy)
    config = CalibConfig(samples=12, holdout=0)
    shared = dict(rank=6, chunks=2, base="none", topology="shared", ranks="uniform", calib=CALIB, calibration=config)
    at_once, layered = tmp_path / "a.vlora.safetensors", tmp_path / "s.vlora.safetensors"
    compress(tiny_llama, at_once, sequential=False, **shared)
    report = compress(tiny_llama, layered, **shared)
    assert report.calibration["sequential_layers"] == sum(len(f["layers"]) for f in report.families)

    def tensors(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, s = tensors(at_once), tensors(layered)
    bases = [k for k in s if "vlora_basis" in k]
    assert len(bases) == 2 * 7  # two groups in each of q, k, v, o, gate, up, down
    for k in bases:
        assert torch.allclose(s[k], a[k], atol=1e-5), k
    original = {k: v for k, v in tensors(tiny_llama / "model.safetensors").items()}
    down = "model.layers.3.mlp.down_proj.weight"  # the second group's second layer
    basis = s["model.layers.vlora_basis1.mlp.down_proj.weight"]
    wh = Whitener.from_gram(seen[down], 1, config.damping)
    expected = coefficients(original[down].float(), basis.float(), wh)
    stored = s[down + ".vlora_B"]
    assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(stored, a[down + ".vlora_B"], rtol=1e-2)  # the at-once fit's stream is the original's


def test_bad_feedback_is_refused_naming_the_flag(tiny_llama, tmp_path, capsys):
    from vlora_compress.cli.app import compress_main

    with pytest.raises(SystemExit) as exc:
        compress_main([str(tiny_llama), "--feedback", "sideways", "-o", str(tmp_path / "o.vlora.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--feedback must be one of none, inputs, outputs" in err


def test_device_cpu_runs_every_stage_and_bf16_stays_bf16(tmp_path, capsys):
    """--device cpu through alignment, calibration, planning by measurement, the sequential fit and
    the eval; a bf16 model is calibrated in bf16 and its file stores bf16."""
    from safetensors import safe_open

    from vlora_compress.cli.app import compress_main

    folder = tiny_model(tmp_path / "llama", "llama", dtype=torch.bfloat16)
    model = load_model(folder, head="base")
    assert next(model.parameters()).dtype == torch.bfloat16
    out = tmp_path / "o.vlora.safetensors"
    with pytest.raises(SystemExit) as exc:
        compress_main([str(folder), "-o", str(out), "--device", "cpu", "--align", "--calib", str(CALIB),
                       "--calib-samples", "24", "--target-size", "0.6", "--quantize", "none",  # floats: bf16 stays bf16
                       "--eval", str(EVAL), "--eval-samples", "8",
                       "--eval-task", "perplexity", "--json"])
    assert exc.value.code == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["whitened_layers"] == 28 and report["evaluation"]["metrics"][0]["model"] > 0
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "layers" in k} == {"BF16"}
    with pytest.raises(SystemExit) as exc:
        compress_main([str(folder), "-o", str(tmp_path / "x.vlora.safetensors"), "--device", "tpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--device 'tpu'" in err and not (tmp_path / "x.vlora.safetensors").exists()


def _planted_llama(tmp_path):
    """A real 6-layer Llama whose layers 0 and 3, 1 and 4, 2 and 5 read one planted input subspace each."""
    from safetensors.torch import load_file, save_file
    from vlora_compress import synthetic
    from vlora_compress.io.stacks import split_key

    folder = tiny_model(tmp_path / "llama6", "llama", num_hidden_layers=6)
    weights = load_file(str(folder / "model.safetensors"))
    planted = synthetic.planted_shared(0, 10, lambda layer: layer % 3, scale=0.02, noise=0.01)
    weights = {k: planted(k, tuple(v.shape)) if split_key(k) and v.dim() == 2 else v for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, weights


def test_shared_bases_are_tried_by_default_where_next_token_kl_measures_the_plan(tmp_path):
    """--shared auto: on the planted Llama, calibrated and measured by next-token KL (a causal LM's
    default), the plan tries shared bases and finds the planted groups, and its notes say why; the
    same model measured by its hidden states, or with --no-shared, never tries them. The file
    records what was asked (auto), not what it resolved to."""
    from vlora_compress.compress import SHARING_NOTE
    from vlora_compress.io.fileformat import VloraFile

    folder, _ = _planted_llama(tmp_path)
    options = dict(rank=3, ranks="uniform", calib=CALIB)
    tried = lambda report: {c["label"] for d in report.decisions for c in d["candidates"]  # noqa: E731
                            if c["label"].startswith("shared")}
    auto = compress(folder, tmp_path / "a.vlora.safetensors", calibration=CalibConfig(samples=32), **options)
    assert auto.decisions[0]["measure"] == "logits" and SHARING_NOTE in auto.notes
    assert tried(auto) and sum(f["chunks"] == [[0, 3], [1, 4], [2, 5]] for f in auto.families) >= 5, auto.families
    assert VloraFile(tmp_path / "a.vlora.safetensors").config["shared"] is None
    for name, extra in (("h", dict(calibration=CalibConfig(samples=32, measure="hidden"))),
                        ("n", dict(calibration=CalibConfig(samples=32), shared=False))):
        off = compress(folder, tmp_path / f"{name}.vlora.safetensors", **options, **extra)
        assert off.decisions and not tried(off) and SHARING_NOTE not in off.notes
        assert not any("shared" in f["topologies"] for f in off.families)


def test_interleaved_shared_groups_are_fitted_layer_by_layer_and_load_as_expanded(tmp_path):
    """A real Llama whose layers 0 and 3, 1 and 4, 2 and 5 read one planted input subspace each:
    calibrated with --shared, the planner groups them by similarity, the sequential fit meets each
    interleaved group's layers as the stream reaches them (every layer fitted in the pass), and the
    file rebuilds the planted weights; factored loading computes what the expanded model does."""
    from vlora_compress.runtime.factored import load_factored

    folder, weights = _planted_llama(tmp_path)
    path = tmp_path / "m.vlora.safetensors"
    report = compress(folder, path, rank=3, ranks="uniform", shared=True, calib=CALIB,
                      calibration=CalibConfig(samples=32))
    interleaved = [f for f in report.families if f["chunks"] == [[0, 3], [1, 4], [2, 5]]]
    # q, k, v, o, gate, up, down: each interleaved, unless measured with every family compressed a
    # family did better as per-layer SVD (the joint check; its decision records it)
    checks = {d["family"]: d.get("together") for d in report.decisions}
    swapped = [f["family"] for f in report.families if f["chunks"] != [[0, 3], [1, 4], [2, 5]]]
    assert len(interleaved) >= 5, [(f["family"], f["chunks"]) for f in report.families]
    for family in swapped:  # its decision records the check: per-layer SVD measured lower together
        assert checks[family] is not None and checks[family]["per_layer"] < checks[family]["error"], checks
    assert report.calibration["sequential_layers"] == sum(len(f["layers"]) for f in report.families)
    restored = expand(path)
    for f in interleaved:
        if min(f["ranks"]) < 10:  # k and v (32 x 64) get rank 9 at this budget, below the planted 10
            continue
        for layer in range(6):
            key = f["family"].replace("*", str(layer))
            assert (restored[key] - weights[key]).norm() < 0.1 * weights[key].norm(), key
    dense, factored = load_model(path, folder), load_factored(path, folder)
    ids = torch.randint(5, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (dense(input_ids=ids).logits - factored(input_ids=ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("topology", ["shared", "shared-left"])
def test_a_shared_basis_with_residual_factors_round_trips_quantized_factored_and_healed(tmp_path, monkeypatch,
                                                                                         topology):
    """The planner's shared basis plus residual factors, fitted layer by layer on a real Llama in
    int4: the file is version 6 and stores each layer's residual factors, factored loading computes
    what the expanded model does, and healing trains the residual factors and keeps the plan."""
    import vlora_compress.planning.space as space
    from vlora_compress.forms import shared
    from safetensors import safe_open
    from vlora_compress.runtime.factored import load_factored
    from vlora_compress.io.fileformat import VloraFile
    from vlora_compress.heal.distill import HealConfig, heal

    only = lambda config, n: [shared.candidate(topology, 2, config.family_scheme, residual=True)]  # noqa: E731
    monkeypatch.setattr(space, "candidates", only)
    folder = tiny_model(tmp_path / "llama4", "llama", num_hidden_layers=4)
    path = tmp_path / "r.vlora.safetensors"
    report = compress(folder, path, rank=4, ranks="uniform", shared=True, quantize="int4", group_size=32, calib=CALIB,
                      calibration=CalibConfig(samples=16))
    assert report.calibration["sequential_layers"] == 28
    vfile = VloraFile(path)
    assert vfile.checkpoint.metadata["vlora.version"] == "6"
    assert all(c.topology == topology and c.residual and all(c.residual) for f in vfile.plan.families for c in f.chunks)
    with safe_open(str(path), "pt") as f:
        residual = [k for k in f.keys() if ".residual.vlora_" in k]
    assert len(residual) == 2 * 2 * 28  # b and a, integers and scales, of every layer
    dense, factored = load_model(path, folder), load_factored(path, folder)
    ids = torch.randint(5, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (dense(input_ids=ids).logits - factored(input_ids=ids).logits).abs().max() < 1e-4
    healed = tmp_path / "h.vlora.safetensors"
    heal(path, folder, CALIB, healed, HealConfig(steps=2, batch_size=4, lr=1e-2, eval_samples=4))
    after = VloraFile(healed)
    assert after.plan == vfile.plan
    key = "model.layers.1.mlp.up_proj.weight.residual.vlora_A"
    assert not torch.equal(after.get(key), vfile.get(key))
