from vlora_compress import synthetic
from vlora_compress.io.checkpoint import TensorInfo
from vlora_compress.io.stacks import find_stacks, split_key


def infos(specs, dtype="F32"):
    return {k: TensorInfo(k, dtype, tuple(s), None) for k, s in specs}


def families(stack):
    return {f.suffix: (f.layers, f.shape) for f in stack.families}


def test_split_key_takes_the_first_integer_component():
    assert split_key("model.layers.12.self_attn.q_proj.weight") == ("model.layers", 12, "self_attn.q_proj.weight")
    assert split_key("h.3.attn.c_attn.weight") == ("h", 3, "attn.c_attn.weight")
    assert split_key("encoder.block.2.layer.1.DenseReluDense.wi.weight")[1] == 2
    assert split_key("embeddings.word_embeddings.weight") is None
    assert split_key("layers.0") is None  # nothing after the index: not a layer's tensor


def test_gpt2_llama_vit_layouts():
    (gpt2,) = find_stacks(infos(synthetic.gpt2_keys(layers=3)))
    assert gpt2.prefix == "transformer.h" and gpt2.layers == (0, 1, 2)
    assert set(families(gpt2)) == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    assert "transformer.h.0.attn.bias" in gpt2.keys  # the 4-D buffer belongs to the stack, not to a family
    (llama,) = find_stacks(infos(synthetic.llama_keys(layers=3)))
    assert llama.prefix == "model.layers" and len(llama.families) == 7
    (vit,) = find_stacks(infos(synthetic.vit_keys(layers=2)))
    assert vit.prefix == "blocks" and "attn.qkv.weight" in families(vit)


def test_two_stacks_in_one_file():
    stacks = find_stacks(infos(synthetic.t5_keys(enc_layers=3, dec_layers=2)))
    assert [(s.prefix, s.layers) for s in stacks] == [("encoder.block", (0, 1, 2)), ("decoder.block", (0, 1))]
    assert "layer.1.EncDecAttention.k.weight" in families(stacks[1])


def test_moe_experts_are_families_not_layers():
    specs = [(f"model.layers.{i}.mlp.experts.{e}.w1.weight", (8, 4)) for i in range(3) for e in range(2)]
    (stack,) = find_stacks(infos(specs))
    assert stack.layers == (0, 1, 2)
    assert families(stack) == {"mlp.experts.0.w1.weight": ((0, 1, 2), (8, 4)),
                               "mlp.experts.1.w1.weight": ((0, 1, 2), (8, 4))}


def test_shape_changes_split_a_family_and_singletons_are_left_dense():
    shapes = [(8, 4), (8, 4), (16, 4), (16, 4), (16, 4), (8, 4)]
    specs = [(f"blocks.{i}.fc.weight", s) for i, s in enumerate(shapes)]
    (stack,) = find_stacks(infos(specs))
    assert [(f.layers, f.shape) for f in stack.families] == [((0, 1), (8, 4)), ((2, 3, 4), (16, 4))]


def test_missing_layer_breaks_a_run_and_integer_or_1d_tensors_are_not_families():
    specs = [(f"layers.{i}.cross.weight", (4, 4)) for i in (0, 1, 3, 4)] + [("layers.2.other.weight", (4, 4))]
    specs += [(f"layers.{i}.ids", (4, 4)) for i in range(5)]
    specs += [(f"layers.{i}.norm.weight", (4,)) for i in range(5)]
    stacks = find_stacks({**infos(specs), **{f"layers.{i}.ids": TensorInfo(f"layers.{i}.ids", "I64", (4, 4), None)
                                           for i in range(5)}})
    assert [f.layers for f in stacks[0].families] == [(0, 1), (3, 4)]


def test_no_stack_when_nothing_repeats():
    assert find_stacks(infos([("embed.weight", (4, 4)), ("head.0.weight", (4, 4)), ("x.1.bias", (4,))])) == []
