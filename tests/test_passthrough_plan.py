"""The large pass-through matrices (embeddings, an untied head) in the default plan's budget
(planning/passthrough.py), and the next-token KL measured with the head itself replaced."""

import pytest
import torch

from conftest import CALIB, tiny_model
from vlora_compress import compress, expand
from vlora_compress import CalibConfig
from vlora_compress.calibrate import kl
from vlora_compress.calibrate.grams import OutputMeter
from vlora_compress.errors import VloraError
from vlora_compress.io.checkpoint import open_checkpoint
from vlora_compress.io.fileformat import VloraFile
from vlora_compress.io.models import load_model, load_preprocessor

KEYS = ("lm_head.weight", "model.embed_tokens.weight")


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A tiny Llama whose embedding and untied head (2,048 x 64 each) outweigh its layers, as a
    large vocabulary's do: 1 MB of its 1.6 MB in float32."""
    return tiny_model(tmp_path_factory.mktemp("wide") / "llama", "llama", vocab_size=2048, tie_word_embeddings=False)


def test_a_model_target_weighs_the_embedding_and_head_with_the_layers(wide_vocab, tmp_path):
    with open_checkpoint(wide_vocab) as ckpt:
        model_bytes = ckpt.nbytes
        originals = {k: ckpt.read(k) for k in KEYS}
    # as stored, the two matrices alone are 64% of the model: more than the whole target
    assert sum(t.numel() * 4 for t in originals.values()) > 0.3 * model_bytes
    path = tmp_path / "m.vlora.safetensors"
    report = compress(wide_vocab, path, calib=CALIB, target_size="0.3", target_of="model", device="cpu")
    assert path.stat().st_size <= report.target["budget_bytes"] + 4096  # the header is not in the budget
    decisions = {d["family"]: d for d in report.decisions if d["family"] in KEYS}
    assert set(decisions) == set(KEYS)
    stored = expand(path)
    for key, d in decisions.items():
        by = {c["storage"]: c for c in d["candidates"]}
        assert set(by) == {"none", "int8", "int4"}
        assert by["none"]["error"] == 0 and 0 < by["int8"]["error"] < by["int4"]["error"]  # each measured alone
        assert by["int4"]["bytes"] < by["int8"]["bytes"] < by["none"]["bytes"]
        taken = d["candidates"][d["chosen"]]["storage"]
        change = (stored[key].float() - originals[key].float()).abs().max()
        assert (change == 0) == (taken == "none")  # what the file holds is what the plan took
        held = report.passthrough["schemes"] if report.passthrough else []
        assert taken == "none" or any(taken in s for s in held)


def test_bytes_the_layers_cannot_use_keep_a_matrix_as_stored(wide_vocab, tmp_path):
    """At 0.6 of the model every family fits whole in fp16 with bytes to spare: the allocation
    spends them on the matrix whose int8 rounding measured worse, stored as it was."""
    path = tmp_path / "g.vlora.safetensors"
    report = compress(wide_vocab, path, calib=CALIB, target_size="0.6", target_of="model", device="cpu")
    assert path.stat().st_size <= report.target["budget_bytes"] + 4096
    (allocation,) = VloraFile(path).plan.allocations
    moved = {key: (before, after) for key, before, after in allocation.moved if key in KEYS}
    assert allocation.outcome == "allocated" and list(moved.values()) == [("int8", "none")], allocation
    decisions = {d["family"]: d for d in report.decisions if d["family"] in KEYS}
    (kept,) = moved
    errors = {k: next(c["error"] for c in d["candidates"] if c["storage"] == "int8") for k, d in decisions.items()}
    assert errors[kept] == max(errors.values())
    with open_checkpoint(wide_vocab) as ckpt:
        assert torch.equal(expand(path)[kept], ckpt.read(kept))


@pytest.mark.parametrize("options", [dict(calibration=CalibConfig(measure="hidden")), dict(ranks="uniform")])
def test_a_matrix_the_plan_cannot_weigh_is_stored_in_int8_as_the_budget_counted_it(wide_vocab, tmp_path, options):
    """Measured at the base model's hidden states the head is outside what the meter runs; with
    uniform ranks there is no allocation to weigh anything in. Either way what is not weighed is
    stored in int8, where the stacks' budget put it, and the file keeps to the target."""
    path = tmp_path / "u.vlora.safetensors"
    report = compress(wide_vocab, path, calib=CALIB, target_size="0.3", target_of="model", device="cpu", **options)
    assert path.stat().st_size <= report.target["budget_bytes"] + 4096
    decided = {d["family"] for d in report.decisions if d["family"] in KEYS}
    assert "lm_head.weight" not in decided
    assert decided == ({"model.embed_tokens.weight"} if "calibration" in options else set())
    assert "lm_head.weight" in report.passthrough["tensors"]
    with open_checkpoint(wide_vocab) as ckpt:
        head = ckpt.read("lm_head.weight")
    rounded = expand(path)["lm_head.weight"]
    step = head.abs().amax(1, keepdim=True) / 127  # int8: one scale a row
    assert 0 < (rounded - head).abs().max() and ((rounded - head).abs() <= step / 2 + 1e-6).all()


def test_a_stack_target_leaves_the_pass_through_matrices_as_stored(wide_vocab, tmp_path):
    report = compress(wide_vocab, tmp_path / "s.vlora.safetensors", calib=CALIB, target_size="0.5",
                      target_of="stack", device="cpu")
    assert report.passthrough is None
    assert not any(d["family"] in KEYS for d in report.decisions)
    with pytest.raises(VloraError, match="leaves 0 bytes"):  # without calibration nothing is weighed
        compress(wide_vocab, tmp_path / "f.vlora.safetensors", target_size="0.3", target_of="model", device="cpu")


@pytest.mark.parametrize("tied", [False, True])
def test_a_replaced_head_is_measured_over_the_whole_vocabulary(tmp_path, monkeypatch, tied):
    """The meter's head path (kl.py) takes the hidden state's change to first order, which does not
    see a change of the head: with the head (or the embedding tied to it) replaced, its KL is the
    plain one, over the whole vocabulary."""
    folder = tiny_model(tmp_path / "m", "llama", vocab_size=1024, tie_word_embeddings=tied)
    texts = CALIB.read_text().split("\n\n")[:8]
    key = "model.embed_tokens.weight" if tied else "lm_head.weight"
    with open_checkpoint(folder) as ckpt:
        w = ckpt.read(key)
    noisy = w + 0.2 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    tok = load_preprocessor(folder)
    fast = OutputMeter(load_model(folder), tok, texts, 64, measure="logits")
    assert fast.head is not None  # the head path, which must notice the replacement
    monkeypatch.setattr(kl, "plain_head", lambda model: None)
    plain = OutputMeter(load_model(folder), tok, texts, 64, measure="logits")
    assert plain.head is None
    got, want = fast({key: noisy}), plain({key: noisy})
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-3)
    assert fast({}) == pytest.approx(0, abs=1e-9)  # and the loaded head is its own again
