import pytest

from vlora_compress import VloraError
from vlora_compress.plan import ChunkPlan, CompressConfig, Plan, plan_equal, split_equal
from vlora_compress.stacks import Family, Stack


def test_split_equal_gives_contiguous_chunks_covering_every_layer():
    assert split_equal(6, 3) == ((0, 2), (2, 4), (4, 6))
    assert split_equal(7, 3) == ((0, 3), (3, 5), (5, 7))
    assert split_equal(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert split_equal(5, 1) == ((0, 5),)


def test_chain_steps_walk_outward_from_the_base():
    c = ChunkPlan((4, 5, 6, 7), (4, 4, 0, 4), base=6)
    assert c.steps() == [(7, 6), (5, 6), (4, 5)]
    assert c.rebuild_order() == [6, 7, 5, 4]
    assert ChunkPlan((0, 1, 2), (0, 2, 2), base=0).steps() == [(1, 0), (2, 1)]
    assert ChunkPlan((0, 1), (1, 1), base="synthetic").steps() == [(0, None), (1, 0)]
    assert ChunkPlan((0, 1, 2), (1, 0, 1), base=1, topology="star").steps() == [(0, None), (2, None)]


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
    again = Plan.from_dict(plan.to_dict())
    assert again == plan
    assert again.families[0].store_dtype == "F32" and again.families[0].dtype == "BF16"


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
    """plan.family_bytes (what planning and the dense rule count) equals fileformat's stored layout."""
    from vlora_compress.fileformat import family_layout
    from vlora_compress.plan import family_bytes
    from vlora_compress.report import nbytes

    fam = Family("h", "w", (0, 1, 2, 3), (6, 10), "F32")
    plan = plan_equal([Stack("h", (0, 1, 2, 3), (fam,), ())], CompressConfig(**options))
    (fp,) = plan.families
    assert family_bytes(fp) == sum(nbytes(dt, shape) for _, dt, shape in family_layout(fp)) > 0
