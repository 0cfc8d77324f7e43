import pytest
import torch

from vlora_compress import compress, delta_spectra, inspect_checkpoint, inspect_vlora, synthetic
from vlora_compress.io.checkpoint import open_checkpoint
from vlora_compress.report.inspection import sparkline, subspace_sharing
from vlora_compress.io.write import SafetensorsWriter

from conftest import CALIB, CORE


def test_minilm_deltas_are_nearly_full_rank(minilm_dir):
    """The measured fact the whole design starts from: rank 4 keeps under a tenth of a delta."""
    rows = delta_spectra(minilm_dir, rank=4)
    assert len(rows) == 6 * 5
    mean_rel = sum(r["rel_delta"] for r in rows) / len(rows)
    mean_kept = sum(r["energy_kept"] for r in rows) / len(rows)
    assert 1.3 < mean_rel < 1.5
    assert 0.03 < mean_kept < 0.12
    with open_checkpoint(minilm_dir) as ckpt:
        w0 = ckpt.read("encoder.layer.0.intermediate.dense.weight").double()
        w1 = ckpt.read("encoder.layer.1.intermediate.dense.weight").double()
    s = torch.linalg.svdvals(w1 - w0)
    row = next(r for r in rows if r["family"] == "encoder.layer.*.intermediate.dense.weight" and r["layers"] == [0, 1])
    assert row["energy_kept"] == pytest.approx(float(s[:4].square().sum() / s.square().sum()), rel=1e-9)
    assert row["rel_delta"] == pytest.approx(float((w1 - w0).norm() / w1.norm()), rel=1e-9)


def test_planted_rank_shows_in_the_spectrum(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "p.safetensors", synthetic.gpt2_keys(layers=3),
                                     synthetic.planted_chain(0, 3, {0}))
    rows = delta_spectra(src, rank=3)
    assert all(r["energy_kept"] > 0.999999 for r in rows)
    assert all(r["rank_for"]["99"] <= 3 for r in rows)


def test_inspect_checkpoint_counts_every_byte(minilm_dir):
    info = inspect_checkpoint(minilm_dir)
    (stack,) = info["stacks"]
    assert stack["prefix"] == "encoder.layer" and stack["layers"] == [0, 1, 2, 3, 4, 5]
    assert stack["factorisable_bytes"] == 6 * 4 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert info["outside_stacks_bytes"] + stack["bytes"] == info["bytes"]


def test_inspect_vlora_splits_bytes_by_role(gpt2_file, tmp_path):
    out = tmp_path / "g.vlora.safetensors"
    compress(gpt2_file, out, rank=2, chunks=2, **CORE)
    info = inspect_vlora(out)
    roles = info["bytes_by_role"]
    assert sum(roles.values()) == info["bytes"]
    d = 64
    assert roles["increments"] == 4 * 2 * 2 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert info["families"][0]["chunks"][0] == {"layers": [0, 1], "base": 0, "topology": "chain", "ranks": [0, 2]}


def test_sparkline_falls_with_the_spectrum():
    line = sparkline([1.0, 0.5, 0.1, 0.01, 0.001, 0.0001], width=6)
    assert line[0] == "█" and line[-1] == "▁" and len(line) == 6


def test_layers_that_share_a_subspace_show_it_on_that_side_and_no_other(tmp_path):
    """Layers 0 and 1 are U C_l with one rank-4 U (their outputs share a basis); layers 2 and 3 are
    C_l V with one V (their inputs do). Each pair keeps all of the other's energy on its side, and
    about a random share (rank / dim) elsewhere."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 48, 40, 4
    u, v = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    weights = {0: u @ torch.randn(k, n, generator=g), 1: u @ torch.randn(k, n, generator=g),
               2: torch.randn(m, k, generator=g) @ v, 3: torch.randn(m, k, generator=g) @ v}
    path = tmp_path / "s.safetensors"
    with SafetensorsWriter(path, [(f"layers.{i}.w.weight", "F32", (m, n)) for i in weights]) as w:
        for i, t in weights.items():
            w.write(f"layers.{i}.w.weight", t)
    rows = {r["side"]: r for r in subspace_sharing(path, rank=k)}
    out, inp = rows["output"]["kept"], rows["input"]["kept"]
    assert out[0][1] == pytest.approx(1.0) and out[1][0] == pytest.approx(1.0)
    assert inp[2][3] == pytest.approx(1.0) and inp[3][2] == pytest.approx(1.0)
    assert out[2][3] < 4 * k / m and inp[0][1] < 4 * k / n  # the other side: about random
    assert out[0][2] < 4 * k / m and inp[2][0] < 4 * k / n
    assert rows["output"]["whitened"] is False and rows["output"]["neighbour"] < 1.0


def test_the_whitened_subspace_view_of_a_real_model(minilm_dir, tmp_path, capsys):
    """MiniLM, whitened by its calibration inputs: each layer's own subspace keeps the most of its
    own energy (Eckart-Young: no other rank-r subspace keeps more), and the CLI prints, writes
    and draws it."""
    import json

    from vlora_compress.cli.app import inspect_main

    with pytest.raises(SystemExit) as exc:
        inspect_main([str(minilm_dir), "--spectra", "--rank", "16", "--json", "--calib", str(CALIB),
                      "--calib-samples", "32"])
    assert exc.value.code == 0
    rows = json.loads(capsys.readouterr().out)["subspaces"]
    assert len(rows) == 2 * 6 and all(r["whitened"] for r in rows)
    for r in rows:
        kept = r["kept"]
        for j in range(6):
            assert kept[j][j] >= max(kept[i][j] for i in range(6)) - 1e-9
        assert r["random"] < r["best_other"] < 1.0
    pytest.importorskip("matplotlib")
    png = tmp_path / "heat.png"
    with pytest.raises(SystemExit) as exc:
        inspect_main(["plot", "subspaces", str(minilm_dir), "-o", str(png), "--rank", "16"])
    assert exc.value.code == 0 and png.stat().st_size > 10_000
