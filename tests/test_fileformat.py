"""The VLoRA format: every base and topology it can express expands, and damage is refused."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlora_compress import VloraError, compress, expand, synthetic
from vlora_compress.io.checkpoint import open_checkpoint
from vlora_compress.compress import source_info
from vlora_compress.fit.factorise import fit_family
from vlora_compress.fit.svd import truncated_svd
from vlora_compress.io.fileformat import VloraFile, header_metadata, layout
from vlora_compress.plan import increment_keys
from vlora_compress.config import CompressConfig
from vlora_compress.plan import ChunkPlan, FamilyPlan, Plan, StackPlan
from vlora_compress.io.write import SafetensorsWriter

from conftest import CORE

SPECS = [(f"layers.{i}.w.weight", (24, 16)) for i in range(4)] + [(f"layers.{i}.b", (24,)) for i in range(4)]


def _write_vlora(path, src, plan, stored: dict):
    with open_checkpoint(src) as ckpt:
        record = source_info(ckpt)
        entries = layout(plan, record)
        with SafetensorsWriter(path, entries, header_metadata(plan, record, {})) as w:
            for name, _, _ in entries:
                w.write(name, stored[name] if name in stored else ckpt.read(name))


def _family(chunk: ChunkPlan) -> Plan:
    fp = FamilyPlan("layers", "w.weight", (24, 16), "F32", "F32", (chunk,))
    return Plan((StackPlan("layers", (0, 1, 2, 3), ((0, 4),)),), (fp,))


def test_star_over_a_synthetic_mean_base_expands(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "s.safetensors", SPECS)
    with open_checkpoint(src) as ckpt:
        w = [ckpt.read(f"layers.{i}.w.weight") for i in range(4)]
    plan = _family(ChunkPlan((0, 1, 2, 3), (3, 3, 0, 5), base="synthetic", topology="star"))
    base = torch.stack(w).mean(0)
    stored = {plan.families[0].synthetic_base_key(0): base}
    expected = {}
    for i, r in enumerate((3, 3, 0, 5)):
        b, a = truncated_svd(w[i] - base, r)
        if r:
            stored.update(dict(zip(increment_keys(f"layers.{i}.w.weight"), (b, a))))
        expected[i] = base + b @ a
    out = tmp_path / "s.vlora.safetensors"
    _write_vlora(out, src, plan, stored)
    dense = expand(out)
    assert list(dense) == [k for k, _ in SPECS]
    for i in range(4):
        assert torch.allclose(dense[f"layers.{i}.w.weight"], expected[i], atol=1e-6)
    assert torch.equal(dense["layers.2.w.weight"], base)  # rank 0 means "equals the base"


@pytest.mark.parametrize("base", [0, 2, 3])
def test_chain_from_any_base_layer_recovers_planted_rank(tmp_path, base):
    src = synthetic.write_checkpoint(tmp_path / "c.safetensors", SPECS, synthetic.planted_chain(3, 2, {0}))
    ranks = tuple(0 if i == base else 2 for i in range(4))
    plan = _family(ChunkPlan((0, 1, 2, 3), ranks, base=base, topology="chain"))
    with open_checkpoint(src) as ckpt:
        items = list(fit_family(plan.families[0], ckpt.read, CompressConfig(rank=2)))
        original = {k: ckpt.read(k) for k in ckpt.infos}
    stored = dict(x for x in items if isinstance(x, tuple))
    out = tmp_path / "c.vlora.safetensors"
    _write_vlora(out, src, plan, stored)
    for key, t in expand(out).items():
        assert torch.allclose(t, original[key], atol=1e-5), key


def _rewrite(path, out, *, metadata=None, drop=None, replace=None):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    meta.update(metadata or {})
    tensors.update(replace or {})
    save_file(tensors, str(out), meta)
    return out


@pytest.fixture
def vlora_file(gpt2_file, tmp_path):
    out = tmp_path / "g.vlora.safetensors"
    compress(gpt2_file, out, rank=2, chunks=2, **CORE)
    return out


def test_wrong_format_version_is_refused(vlora_file, tmp_path):
    bad = _rewrite(vlora_file, tmp_path / "v7.safetensors", metadata={"vlora.version": "7"})
    with pytest.raises(VloraError, match="format version .7.; this tool reads versions 1, 2, 3, 4, 5, 6"):
        VloraFile(bad)


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p.update(families="nope"), "corrupted plan"),
    (lambda p: p["families"][0]["chunks"][0].update(ranks=[0]), "mismatched layers and ranks"),
    (lambda p: p["families"][0]["chunks"][0].update(topology="tree"), "unknown topology"),
    (lambda p: p["families"][0]["chunks"][0].update(base=7), "not in its chunk"),
    (lambda p: p["families"][0]["chunks"][0].update(ranks=[0, 3]), "plan says"),
    (lambda p: p["families"][0].update(suffix="attn.nothing.weight"), "missing"),
])
def test_corrupted_plan_is_refused(vlora_file, tmp_path, mutate, match):
    with safe_open(str(vlora_file), "pt") as f:
        plan = json.loads(f.metadata()["vlora.plan"])
    mutate(plan)
    bad = _rewrite(vlora_file, tmp_path / "bad.safetensors", metadata={"vlora.plan": json.dumps(plan)})
    with pytest.raises(VloraError, match=match):
        VloraFile(bad)


def test_plan_that_is_not_json_is_refused(vlora_file, tmp_path):
    bad = _rewrite(vlora_file, tmp_path / "bad.safetensors", metadata={"vlora.plan": "{not json"})
    with pytest.raises(VloraError, match="corrupted plan"):
        VloraFile(bad)


def test_missing_or_reshaped_tensor_is_refused(vlora_file, tmp_path):
    key = "transformer.h.1.attn.c_attn.weight"
    a_key = increment_keys(key)[1]
    bad = _rewrite(vlora_file, tmp_path / "drop.safetensors", drop=a_key)
    with pytest.raises(VloraError, match="is missing"):
        VloraFile(bad)
    bad = _rewrite(vlora_file, tmp_path / "shape.safetensors", replace={a_key: torch.zeros(3, 192)})
    with pytest.raises(VloraError, match=r"F32\[3, 192\], the plan says F32\[2, 192\]"):
        VloraFile(bad)
    bad = _rewrite(vlora_file, tmp_path / "extra.safetensors", replace={"stray": torch.zeros(1)})
    with pytest.raises(VloraError, match="'stray' is not in the plan"):
        VloraFile(bad)


def test_header_records_what_expand_needs(vlora_file, gpt2_file):
    v = VloraFile(vlora_file)
    with open_checkpoint(gpt2_file) as ckpt:
        assert v.source.sha256 == ckpt.sha256()
        assert [k for k, _, _ in v.source.tensors] == list(ckpt.infos)
    assert v.source.metadata == {"format": "pt"}
    assert v.config["rank"] == 2 and v.config["chunks"] == 2
