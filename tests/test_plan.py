import json
from dataclasses import replace

import pytest

from vlora_compress import VloraError
from vlora_compress import CompressConfig
from vlora_compress.io.plan_record import read_plan
from vlora_compress.forms import FORMS, form_of
from vlora_compress.plan import ChunkPlan, split_equal
from vlora_compress.planning.fixed import plan_equal
from vlora_compress.io.stacks import Family, Stack


def test_split_equal_gives_contiguous_chunks_covering_every_layer():
    assert split_equal(6, 3) == ((0, 2), (2, 4), (4, 6))
    assert split_equal(7, 3) == ((0, 3), (3, 5), (5, 7))
    assert split_equal(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert split_equal(5, 1) == ((0, 5),)


def steps(chunk):
    return form_of(chunk).steps(chunk)


def test_chain_steps_walk_outward_from_the_base():
    c = ChunkPlan((4, 5, 6, 7), (4, 4, 0, 4), base=6)
    assert steps(c) == [(7, 6), (5, 6), (4, 5)]
    assert steps(ChunkPlan((0, 1, 2), (0, 2, 2), base=0)) == [(1, 0), (2, 1)]
    assert steps(ChunkPlan((0, 1), (1, 1), base="synthetic")) == [(0, None), (1, 0)]
    assert steps(ChunkPlan((0, 1, 2), (1, 0, 1), base=1, topology="star")) == [(0, None), (2, None)]


@pytest.mark.parametrize("chunk, form", [
    (ChunkPlan((3,), (0,), 3), "dense"),
    (ChunkPlan((3,), (0,), 3, "star"), "dense"),
    (ChunkPlan((0, 1, 2), (2, 2, 2), "none", "star"), "per-layer"),
    (ChunkPlan((0,), (2,), "none", "chain"), "per-layer"),
    (ChunkPlan((0,), (2,), "synthetic", "star"), "quantized + low rank"),
    (ChunkPlan((0, 1), (2, 2), "none", "chain"), "vlora"),
    (ChunkPlan((0, 1), (2, 2), "synthetic", "star"), "vlora"),
    (ChunkPlan((0, 1, 2), (2, 0, 2), 1, "chain"), "vlora"),
    (ChunkPlan((0, 1), (2, 2), "none", "shared"), "shared"),
    (ChunkPlan((0,), (2,), "none", "shared-left", (1,)), "shared"),
])
def test_exactly_one_form_stores_each_kind_of_chunk(chunk, form):
    """form_of is what every reader asks; no chunk a plan can hold is two forms' or none's."""
    assert [f.name for f in FORMS.values() if f.stores(chunk)] == [form]
    assert form_of(chunk).name == form


def test_a_chunk_no_form_stores_is_refused():
    with pytest.raises(VloraError, match="no storage form"):
        form_of(ChunkPlan((0, 1), (2, 2), "none", "diagonal"))


def test_the_format_version_a_chunk_needs_is_its_forms():
    assert form_of(ChunkPlan((0, 1), (0, 2), 0)).version(ChunkPlan((0, 1), (0, 2), 0)) == 1
    for chunk, version in [(ChunkPlan((0, 1), (2, 2), "none", "shared"), 3),
                           (ChunkPlan((0, 1), (2, 2), "none", "shared-left"), 6),
                           (ChunkPlan((0, 1), (2, 2), "none", "shared", (1, 1)), 6)]:
        assert form_of(chunk).version(chunk) == version


def test_plan_equal_clips_rank_and_notes_it():
    fam = Family("h", "w", (0, 1, 2, 3), (6, 10), "F32")
    plan = plan_equal([Stack("h", (0, 1, 2, 3), (fam,), ())], CompressConfig(rank=8, chunks=2))
    assert [c.ranks for c in plan.families[0].chunks] == [(0,)] * 4  # full-rank factors cost more than dense
    assert plan.notes == ("h.*.w: rank 8 clipped to 6, the full rank of [6, 10]",
                          "h.*.w: stored dense: rank-6 factors would cost more than the matrices")
    plan = plan_equal([Stack("h", (0, 1, 2, 3), (fam,), ())], CompressConfig(rank=3, chunks=2))
    assert [c.ranks for c in plan.families[0].chunks] == [(0, 3), (0, 3)] and not plan.notes


def test_plan_round_trips_through_a_dict():
    fam = Family("m.layers", "q.weight", (0, 1, 2, 3, 4), (8, 8), "BF16")
    plan = plan_equal([Stack("m.layers", (0, 1, 2, 3, 4), (fam,), ())], CompressConfig(rank=2, chunks=2, dtype="fp32"))
    again = read_plan(plan.to_dict())
    assert again == plan
    assert again.families[0].store_dtype == "F32" and again.families[0].dtype == "BF16"


def test_allocation_and_the_joint_check_are_data_the_notes_are_rendered_from():
    """What measured rank allocation did and each family's joint check round-trip through the plan's
    record as data; the notes are rendered from them; a plan written before they were recorded (no
    "allocations", decisions without "together") reads as it did, and a plan without them writes
    neither field."""
    from vlora_compress.plan import Allocation, Decision, Together, Weighed, together_note

    fam = Family("m.layers", "q.weight", (0, 1, 2, 3), (8, 8), "F32")
    plan = plan_equal([Stack("m.layers", (0, 1, 2, 3), (fam,), ())], CompressConfig(rank=2, chunks=2))
    weighed = Weighed("per-layer SVD", "per-layer", 2, "none", 100, 0.25, 0.125)
    checked = Together("shared basis, 2 groups", 0.5, 0.25)
    decisions = (Decision("m.layers.*.q.weight", 100, "model", (weighed,), 0, together=checked),
                 Decision("m.layers.*.k.weight", 100, "model", (weighed,), 0))
    allocation = Allocation("allocated", 0.5, 0.75, (("m.layers.*.q.weight", "per-layer SVD", "int4 + low rank"),))
    old = plan.to_dict()
    assert "allocations" not in old and "decisions" not in old
    plan = replace(plan, decisions=decisions, allocations=(allocation,))
    data = json.loads(json.dumps(plan.to_dict()))
    assert "together" not in data["decisions"][1]
    again = read_plan(data)
    assert again == plan and again.decisions[0].together.per_layer_ships
    assert allocation.note == ("ranks: allocated by measured sensitivity, output error 0.5 vs 0.75 uniform; "
                               "bits moved: m.layers.*.q.weight per-layer SVD -> int4 + low rank")
    assert Allocation("kept", 0.75, 0.5).note == "ranks: uniform kept, output error 0.5 vs 0.75 allocated"
    assert together_note(again.decisions) == ("checked together (output error, every family compressed): "
                                              "m.layers.*.q.weight shared basis, 2 groups 0.5 vs per-layer SVD 0.25: "
                                              "per-layer SVD ships")
    assert together_note(decisions[1:]) == ""
    for d in data["decisions"]:
        d.pop("together", None)
    del data["allocations"]
    older = read_plan(data)
    assert older.allocations == () and all(d.together is None for d in older.decisions)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "`rank`"), ({"rank": 2.5}, "`rank`"), ({"chunks": 0}, "`chunks`"),
    ({"svd": "qr"}, "`svd`"), ({"dtype": "fp8"}, "`dtype`"), ({"target_of": "layers"}, "`target_of`"),
    ({"target_size": "lots"}, "`target_size`"), ({"calibration": {"samples": 3}}, "`calibration`"),
])
def test_config_refuses_bad_values(kwargs, match):
    with pytest.raises(VloraError, match=match):
        CompressConfig(**kwargs)


def test_more_chunks_than_layers_names_the_stack():
    fam = Family("enc", "w", (0, 1), (4, 4), "F32")
    with pytest.raises(VloraError, match="more than the 2 layers of stack 'enc'"):
        plan_equal([Stack("enc", (0, 1), (fam,), ())], CompressConfig(chunks=3))


@pytest.mark.parametrize("options", [dict(method="svd", rank=3), dict(rank=3, chunks=2, quantize="int4", group_size=4),
                                     dict(rank=2, chunks=2, quantize="int8", dtype="fp16"), dict(method="svd", rank=9)])
def test_family_bytes_is_the_layout_a_file_stores(options):
    """forms.family_bytes (what planning and the dense rule count) equals fileformat's stored layout."""
    from vlora_compress.io.fileformat import family_layout
    from vlora_compress.forms import family_bytes
    from vlora_compress.report.compress_report import nbytes

    fam = Family("h", "w", (0, 1, 2, 3), (6, 10), "F32")
    plan = plan_equal([Stack("h", (0, 1, 2, 3), (fam,), ())], CompressConfig(**options))
    (fp,) = plan.families
    assert family_bytes(fp) == sum(nbytes(dt, shape) for _, dt, shape in family_layout(fp)) > 0


def test_interleaved_chunks_are_walked_by_layer_and_each_rebuilds_over_its_own_terms():
    """A chain over layers 0, 2, 4, a shared basis over 1 and 3, and a chain over a synthetic base for
    5 and 6: the walk meets the layers in order (the sequential fit reaches each when the stream
    does), a base just before its chunk's first layer; the layout stays chunk by chunk; and every
    layer rebuilds over its own chunk's terms, as format.md section 6 says per chunk, however the
    chunks interleave (expand and factored loading both)."""
    import torch

    from vlora_compress.runtime.factored import layer_terms
    from vlora_compress.fit.factorise import rebuild_family
    from vlora_compress.forms import family_matrices, walk
    from vlora_compress.plan import FamilyPlan

    fp = FamilyPlan("h", "w", (5, 7), "F32", "F32", (ChunkPlan((0, 2, 4), (0, 2, 2), 0, "chain"),
                                                      ChunkPlan((1, 3), (2, 2), "none", "shared"),
                                                      ChunkPlan((5, 6), (2, 2), "synthetic", "chain")))
    terms = list(walk(fp))
    assert [(t.chunk, t.layer) for t in terms] == [(0, 0), (1, None), (1, 1), (0, 2), (1, 3), (0, 4), (2, None),
                                                   (2, 5), (2, 6)]
    assert [t.layer for t in terms if t.last] == [3, 4, 6]
    layout = [name for name, _ in family_matrices(fp)]
    assert layout == ["h.0.w", "h.2.w.vlora_B", "h.2.w.vlora_A", "h.4.w.vlora_B", "h.4.w.vlora_A",
                      "h.vlora_basis1.w", "h.1.w.vlora_B", "h.3.w.vlora_B",
                      "h.vlora_base2.w", "h.5.w.vlora_B", "h.5.w.vlora_A", "h.6.w.vlora_B", "h.6.w.vlora_A"]
    g = torch.Generator().manual_seed(0)
    t = {name: torch.randn(shape, generator=g) for name, shape in family_matrices(fp)}
    inc = lambda layer: t[f"h.{layer}.w.vlora_B"] @ t[f"h.{layer}.w.vlora_A"]  # noqa: E731
    want = {0: t["h.0.w"], 1: t["h.1.w.vlora_B"] @ t["h.vlora_basis1.w"], 3: t["h.3.w.vlora_B"] @ t["h.vlora_basis1.w"]}
    want[2] = want[0] + inc(2)
    want[4] = want[2] + inc(4)
    want[5] = t["h.vlora_base2.w"] + inc(5)
    want[6] = want[5] + inc(6)
    got = dict(rebuild_family(fp, t.__getitem__))
    assert got.keys() == {f"h.{layer}.w" for layer in want}
    for layer, w in want.items():
        assert torch.allclose(got[f"h.{layer}.w"], w, atol=1e-5), layer
    terms = layer_terms(fp)  # what factored loading sums per layer
    assert terms[4] == ("h.0.w", [("h.2.w.vlora_B", "h.2.w.vlora_A"), ("h.4.w.vlora_B", "h.4.w.vlora_A")])
    assert terms[3] == (None, [("h.3.w.vlora_B", "h.vlora_basis1.w")])
    assert terms[6] == ("h.vlora_base2.w", [("h.5.w.vlora_B", "h.5.w.vlora_A"), ("h.6.w.vlora_B", "h.6.w.vlora_A")])


def test_residual_ranks_belong_to_shared_chunks_one_per_layer():
    """A plan with residual ranks on a chain, too few of them, or out of range is refused in one
    line; on a shared chunk they round-trip, and a plan without them writes no field at all."""
    fam = Family("m.layers", "q.weight", (0, 1, 2, 3), (8, 8), "F32")
    plan = plan_equal([Stack("m.layers", (0, 1, 2, 3), (fam,), ())], CompressConfig(rank=2, chunks=2))
    data = plan.to_dict()
    assert all("residual" not in c for c in data["families"][0]["chunks"])
    shared = {"layers": [0, 2], "ranks": [2, 2], "base": "none", "topology": "shared-left", "residual": [1, 1]}
    data["families"][0]["chunks"] = [shared, {**shared, "layers": [1, 3]}]
    assert read_plan(data).families[0].chunks[1].residual == (1, 1)
    for bad in ({"topology": "chain", "base": 0, "ranks": [0, 2]}, {"residual": [1]}, {"residual": [1, 9]}):
        data["families"][0]["chunks"] = [{**shared, **bad}, {**shared, "layers": [1, 3]}]
        with pytest.raises(VloraError, match="residual ranks"):
            read_plan(data)


def test_matrix_roles_call_a_shared_basis_a_factor_and_a_stored_layer_a_base():
    """One rule for what is a base and what a factor, read from the walk: healing's --freeze and
    vlora-inspect's byte split both follow it (a shared basis once froze with the bases)."""
    from vlora_compress.forms.stored import family_matrices, matrix_roles
    from vlora_compress.plan import FamilyPlan

    shared = FamilyPlan("h", "w", (6, 10), "F32", "F32", (ChunkPlan((0, 1), (2, 2), "none", "shared", (1, 1)),))
    roles = matrix_roles(shared)
    assert roles["h.vlora_basis0.w"] == "factor"
    assert {roles[f"h.{x}.w.vlora_B"] for x in (0, 1)} == {"factor"}
    assert roles["h.0.w.residual.vlora_A"] == "factor"
    chain = FamilyPlan("h", "w", (6, 10), "F32", "F32", (ChunkPlan((0, 1, 2), (0, 2, 2), 0, "chain"),
                                                         ChunkPlan((3,), (3,), "synthetic", "star")))
    roles = matrix_roles(chain)
    assert roles["h.0.w"] == "base" and roles["h.vlora_base1.w"] == "base"
    assert roles["h.2.w.vlora_A"] == "factor" and "h.1.w" not in roles
    assert set(roles) == {name for name, _ in family_matrices(chain)}
