import json

import pytest
import torch
from safetensors import safe_open

from conftest import CALIB, EVAL, hidden_error, tiny_model
from vlora_compress import CalibConfig, VloraError, compress, expand, inspect_vlora
from vlora_compress.calibrate.grams import read_calibration
from vlora_compress.fit.svd import apply_increment, choose_svd, truncated_svd
from vlora_compress.io.fileformat import VloraFile
from vlora_compress.io.models import load_preprocessor
from vlora_compress.io.write import SafetensorsWriter


def low_rank(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


def test_exact_svd_recovers_an_exact_low_rank_matrix():
    d = low_rank(40, 30, 5)
    b, a = truncated_svd(d, 5, "exact")
    assert b.shape == (40, 5) and a.shape == (5, 30) and b.dtype == torch.float32
    assert torch.allclose(b @ a, d, atol=1e-4)


def test_truncation_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(50, 40, generator=g)
    s = torch.linalg.svdvals(d.double())
    b, a = truncated_svd(d, 7, "exact")
    err = torch.linalg.norm(d - b @ a).item()
    assert abs(err - s[7:].square().sum().sqrt().item()) < 1e-4  # Eckart-Young


def test_randomised_svd_is_close_to_exact_and_deterministic():
    d = low_rank(300, 200, 6) + 1e-3 * torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    be, ae = truncated_svd(d, 6, "exact")
    br, ar = truncated_svd(d, 6, "randomized", seed=3)
    assert torch.linalg.norm(br @ ar - be @ ae) / torch.linalg.norm(be @ ae) < 1e-3
    br2, ar2 = truncated_svd(d, 6, "randomized", seed=3)
    assert torch.equal(br, br2) and torch.equal(ar, ar2)
    state = torch.random.get_rng_state()
    truncated_svd(d, 6, "randomized", seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_factors_are_canonical_whatever_the_algorithm():
    # exact and randomised SVD pick signs differently; the sign fix makes the factors themselves agree
    d = low_rank(200, 100, 3, seed=4)
    be, ae = truncated_svd(d, 3, "exact")
    br, ar = truncated_svd(d, 3, "randomized", seed=9)
    assert torch.allclose(be, br, atol=1e-3) and torch.allclose(ae, ar, atol=1e-3)
    assert (be.abs().argmax(0) == be.argmax(0)).all()  # largest entry of each column is positive


def test_rank_zero_and_apply_increment():
    ref = torch.randn(6, 4)
    b, a = truncated_svd(torch.randn(6, 4), 0)
    assert b.shape == (6, 0) and torch.equal(apply_increment(ref, b, a), ref)
    b, a = torch.randn(6, 2).half(), torch.randn(2, 4).half()
    assert torch.allclose(apply_increment(ref, b, a), ref + b.float() @ a.float())


def test_auto_uses_exact_where_cheap():
    assert choose_svd((384, 1536), 4, "auto") == "exact"
    assert choose_svd((4096, 4096), 4, "auto") == "randomized"
    assert choose_svd((4096, 4096), 2048, "auto") == "exact"
    assert choose_svd((4096, 4096), 4, "exact") == "exact"


def anisotropic_inputs(n_samples=400, n=32, seed=5, rank=None):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n)
    x = torch.randn(n_samples, n, generator=g, dtype=torch.float64) * scales
    if rank is not None:  # inputs that span only ``rank`` directions: a singular Gram
        x = x[:, :rank] @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    return x


def test_whitening_beats_plain_svd_on_output_error():
    from vlora_compress.fit.svd import Whitener, whitened_svd

    g = torch.Generator().manual_seed(6)
    w = torch.randn(24, 32, generator=g)
    x = anisotropic_inputs()
    wh = Whitener.from_gram(x.T @ x, side=1)
    out_err = lambda b, a: float(torch.linalg.norm((w.double() - (b @ a).double()) @ x.T) / torch.linalg.norm(w.double() @ x.T))  # noqa: E731
    for r in (2, 6, 12):
        plain, white = out_err(*truncated_svd(w, r)), out_err(*whitened_svd(w, r, wh))
        assert white < 0.8 * plain, (r, white, plain)
        assert abs(wh.output_error(w, (lambda b, a: b @ a)(*whitened_svd(w, r, wh))) - white) < 0.05


def test_singular_gram_never_crashes_or_gives_nan():
    from vlora_compress.fit.svd import Whitener, whitened_svd

    x = anisotropic_inputs(rank=5)
    gram = x.T @ x
    try:  # the case SVD-LLM's users hit: Cholesky refuses a rank-deficient Gram
        torch.linalg.cholesky(gram - 1e-9 * torch.eye(32, dtype=torch.float64))
        cholesky_failed = False
    except RuntimeError:
        cholesky_failed = True
    assert cholesky_failed
    w = torch.randn(20, 32, generator=torch.Generator().manual_seed(7))
    wh = Whitener.from_gram(gram, side=1)
    for r in (1, 5, 20):
        b, a = whitened_svd(w, r, wh)
        assert torch.isfinite(b).all() and torch.isfinite(a).all()
    # at rank 5 the inputs' whole span is kept: output error is tiny even though weight error is not
    b, a = whitened_svd(w, 5, Whitener.from_gram(gram, side=1, damping=1e-8))
    assert float(torch.linalg.norm((w.double() - (b @ a).double()) @ x.T) / torch.linalg.norm(w.double() @ x.T)) < 1e-3
    assert float(torch.linalg.norm(w - b @ a) / torch.linalg.norm(w)) > 0.3
    assert Whitener.from_gram(torch.zeros(32, 32), side=1) is None  # no signal: plain SVD is used


def test_conv1d_side_whitens_rows():
    from vlora_compress.fit.svd import Whitener, whitened_svd

    w = torch.randn(32, 24, generator=torch.Generator().manual_seed(8))  # (in, out) as GPT-2 stores it
    x = anisotropic_inputs()
    wh = Whitener.from_gram(x.T @ x, side=0)
    b, a = whitened_svd(w, 6, wh)
    assert b.shape == (32, 6) and a.shape == (6, 24)
    err = lambda w_hat: float(torch.linalg.norm(x @ (w.double() - w_hat.double())))  # noqa: E731
    assert err(b @ a) < 0.8 * err((lambda b, a: b @ a)(*truncated_svd(w, 6)))


def test_a_whitener_holds_one_matrix_and_gives_a_root_and_its_inverse():
    """Kept as eigenvectors and damped eigenvalues (one n x n matrix, not two), it gives S with
    S Sᵀ = G + δI and S⁻¹."""
    from vlora_compress.fit.svd import Whitener

    x = anisotropic_inputs()
    gram = x.T @ x
    wh = Whitener.from_gram(gram, side=1, damping=1e-3)
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.allclose(wh.root @ wh.root.T, gram.double() + wh.damping * eye, rtol=1e-9, atol=1e-9)
    assert torch.allclose(wh.inv @ wh.root, eye, atol=1e-9)
    assert wh.nbytes == 32 * 32 * 8 + 32 * 8


def test_planning_keeps_whitenings_within_a_byte_budget_most_recent_first(monkeypatch):
    import vlora_compress.calibrate.grams as calibrate
    from vlora_compress.calibrate.grams import Grams

    grams = Grams()
    for n, key in enumerate("abc"):
        x = anisotropic_inputs() + n
        grams.grams[key], grams.side[key] = x.T @ x, 1
    monkeypatch.setattr(calibrate, "WHITENER_CACHE_BYTES", 2 * (32 * 32 * 8 + 32 * 8))  # room for two
    a, b = grams.whitener("a"), grams.whitener("b")
    assert grams.whitener("a") is a  # kept, and now the most recent
    grams.whitener("c")  # b, the least recently asked for, goes
    assert grams.whitener("a") is a and grams.whitener("b") is not b
    assert torch.equal(grams.whitener("b").vectors, b.vectors)  # made again, the same
    assert sum(wh.nbytes for wh in grams._whiteners.values()) <= calibrate.WHITENER_CACHE_BYTES


def _shared_input_family(path, layers=6, m=48, n=40, k=4, seed=0):
    """layers.l.w.weight = C_l A: every layer reads its input through one rank-k A."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, n, generator=g)
    weights = {f"layers.{i}.w.weight": torch.randn(m, k, generator=g) @ a for i in range(layers)}
    with SafetensorsWriter(path, [(key, "F32", (m, n)) for key in weights]) as w:
        for key, t in weights.items():
            w.write(key, t)
    return weights


def test_a_shared_basis_stores_one_right_factor_per_group_and_rebuilds_what_shares_it(tmp_path):
    """Six layers that read their inputs through one rank-4 basis: two groups of three, one basis
    each, rebuild every layer (to float rounding) in fewer bytes than per-layer SVD at that rank."""
    weights = _shared_input_family(tmp_path / "s.safetensors")
    shared, per_layer = tmp_path / "shared.vlora.safetensors", tmp_path / "svd.vlora.safetensors"
    report = compress(tmp_path / "s.safetensors", shared, rank=4, chunks=2, base="none", topology="shared",
                      ranks="uniform")
    baseline = compress(tmp_path / "s.safetensors", per_layer, rank=4, method="svd", ranks="uniform")
    rebuilt = expand(shared)
    for key, w in weights.items():
        assert torch.allclose(rebuilt[key], w, atol=1e-4 * w.abs().max()), key
    with safe_open(str(shared), "pt") as f:
        keys = set(f.keys())
    assert {k for k in keys if "vlora_basis" in k} == {"layers.vlora_basis0.w.weight", "layers.vlora_basis1.w.weight"}
    assert not any(k.endswith(".vlora_A") for k in keys) and sum(k.endswith(".vlora_B") for k in keys) == 6
    assert report.stack_compressed_bytes == (2 * 4 * 40 + 6 * 48 * 4) * 4 < baseline.stack_compressed_bytes
    assert VloraFile(shared).checkpoint.metadata["vlora.version"] == "3"  # the format's shared bases
    chunks = json.loads(VloraFile(shared).checkpoint.metadata["vlora.plan"])["families"][0]["chunks"]
    assert [(c["layers"], c["base"], c["topology"]) for c in chunks] == [([0, 1, 2], "none", "shared"),
                                                                         ([3, 4, 5], "none", "shared")]
    info = inspect_vlora(shared)  # the bases a plot of bytes draws are dense ones: a shared basis is a factor
    assert info["families"][0]["bytes"] == {"bases": 0, "increments": report.stack_compressed_bytes}
    assert info["bytes_by_role"]["increments"] == report.stack_compressed_bytes


def test_a_shared_basis_is_refused_with_a_base_and_in_a_plan_that_gives_it_one(tmp_path):
    _shared_input_family(tmp_path / "s.safetensors")
    with pytest.raises(VloraError, match="`topology` shared"):
        compress(tmp_path / "s.safetensors", tmp_path / "x.vlora.safetensors", topology="shared", base="first")
    path = tmp_path / "shared.vlora.safetensors"
    compress(tmp_path / "s.safetensors", path, rank=4, chunks=2, base="none", topology="shared", ranks="uniform")
    from vlora_compress.io.plan_record import read_plan

    plan = json.loads(VloraFile(path).checkpoint.metadata["vlora.plan"])
    plan["families"][0]["chunks"][0]["base"] = 0
    with pytest.raises(VloraError, match="shared chunk"):
        read_plan(plan)


@pytest.mark.parametrize("topology", ["shared", "shared-left"])
def test_a_shared_basis_whitened_and_quantized_works_on_a_causal_lm(tmp_path, topology):
    """Calibrated, a right basis is whitened by its group's summed Grams and each layer's
    coefficients by its own (a left basis by each layer's own Gram): a working model at the bytes
    per-layer SVD takes, and in int8 nearly the same."""
    folder = tiny_model(tmp_path / "llama6", "llama", num_hidden_layers=6)
    held, _ = read_calibration(load_preprocessor(folder), EVAL, CalibConfig(samples=16, holdout=0), causal=True)
    errors = {}
    for name, opts in (("float", {}), ("int8", dict(quantize="int8"))):
        path = tmp_path / f"{name}.vlora.safetensors"
        report = compress(folder, path, rank=8, chunks=3, base="none", topology=topology, ranks="uniform",
                          calib=CALIB, calibration=CalibConfig(samples=32), **opts)
        assert report.calibration["whitened_layers"] == 42
        errors[name] = hidden_error(folder, path, held)
    assert 0 < errors["float"] < 0.5 and errors["int8"] < 1.05 * errors["float"], errors


def test_a_shared_left_factor_stores_one_left_factor_per_group_and_rebuilds_what_shares_it(tmp_path):
    """Six layers that write through one rank-4 output subspace (W_l = B A_l): under shared-left two
    groups of three rebuild every layer to float rounding, each layer storing only its A; the
    input-side basis (topology shared) at that rank cannot; the file is version 6, and a plan that
    claims version 5 with one is refused in one line."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(48, 4, generator=g)
    weights = {f"layers.{i}.w.weight": b @ torch.randn(4, 40, generator=g) for i in range(6)}
    src = tmp_path / "s.safetensors"
    with SafetensorsWriter(src, [(key, "F32", (48, 40)) for key in weights]) as w:
        for key, t in weights.items():
            w.write(key, t)
    left, right = tmp_path / "left.vlora.safetensors", tmp_path / "right.vlora.safetensors"
    report = compress(src, left, rank=4, chunks=2, base="none", topology="shared-left", ranks="uniform")
    compress(src, right, rank=4, chunks=2, base="none", topology="shared", ranks="uniform")
    rebuilt, other = expand(left), expand(right)
    for key, w in weights.items():
        assert torch.allclose(rebuilt[key], w, atol=1e-4 * w.abs().max()), key
    assert max((other[k] - w).norm() / w.norm() for k, w in weights.items()) > 0.1
    with safe_open(str(left), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: s for k, s in shapes.items() if "vlora_basis" in k} == {"layers.vlora_basis0.w.weight": (48, 4),
                                                                      "layers.vlora_basis1.w.weight": (48, 4)}
    assert not any(k.endswith(".vlora_B") for k in shapes) and sum(k.endswith(".vlora_A") for k in shapes) == 6
    assert report.stack_compressed_bytes == (2 * 48 * 4 + 6 * 4 * 40) * 4
    meta = VloraFile(left).checkpoint.metadata
    assert meta["vlora.version"] == "6"
    from vlora_compress.io.write import SafetensorsWriter as Writer

    old = tmp_path / "old.vlora.safetensors"
    with safe_open(str(left), "pt") as f, Writer(old, [(k, "F32", shapes[k]) for k in shapes],
                                                  {**meta, "vlora.version": "5"}) as w:
        for k in shapes:
            w.write(k, f.get_tensor(k))
    with pytest.raises(VloraError, match="a version 5 file cannot hold shared left factors"):
        VloraFile(old)


def test_a_shared_left_factor_whitened_is_the_best_shared_output_subspace(tmp_path, monkeypatch):
    """Calibrated on a real Llama, B is the top left factor of the group's whitened weights side by
    side, exact under each layer's own Gram: the summed whitened error it leaves is the tail of that
    spectrum, the least any shared left factor of that rank can leave."""
    import vlora_compress.pipelines.sequential as seq
    from safetensors.torch import load_file
    from vlora_compress.fit.svd import Whitener

    seen = {}
    init = seq._Layer.__init__

    def spy(self, modules, grams, alias, damping):
        seen.update({key: grams[alias.get(key, key)] for key in modules})
        init(self, modules, grams, alias, damping)

    monkeypatch.setattr(seq._Layer, "__init__", spy)
    folder = tiny_model(tmp_path / "llama4", "llama", num_hidden_layers=4)
    path = tmp_path / "l.vlora.safetensors"
    config = CalibConfig(samples=16, holdout=0)
    compress(folder, path, rank=6, chunks=2, base="none", topology="shared-left", ranks="uniform", calib=CALIB,
             calibration=config, feedback="none")
    original, restored = load_file(str(folder / "model.safetensors")), expand(path)
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)]  # the first group
    whs = [Whitener.from_gram(seen[k], 1, config.damping) for k in keys]
    side_by_side = torch.cat([wh.whiten(original[k].double()) for k, wh in zip(keys, whs)], dim=1)
    tail = float(torch.linalg.svdvals(side_by_side)[6:].square().sum())
    err = sum(float(wh.whiten((original[k] - restored[k]).double()).square().sum()) for k, wh in zip(keys, whs))
    assert tail * 0.999 < err < 1.01 * tail, (err, tail)
