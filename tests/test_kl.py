"""Next-token KL from the hidden states (calibrate/kl.py): what it measures, that it does not apply the
head to the vocabulary per measurement, and where it falls back to the plain measure."""

import pytest
import torch

from conftest import CALIB
from vlora_compress.calibrate import grams as cal
from vlora_compress.calibrate.grams import OutputMeter
from vlora_compress.io.models import load_model, load_preprocessor

KEY = "model.layers.1.mlp.down_proj.weight"


def _texts(n):
    return [x.strip() for x in CALIB.read_text().splitlines() if x.strip()][:n]


@pytest.fixture
def peaked(tiny_llama):
    lm, tok = load_model(tiny_llama, head="causal-lm"), load_preprocessor(tiny_llama)
    lm.lm_head.weight.data *= 30  # peaked next-token distributions, as a trained LM's (a random one's are flat)
    w = lm.model.layers[1].mlp.down_proj.weight.detach().clone()
    torch.manual_seed(1)
    return lm, tok, {KEY: w + 0.5 * w.std() * torch.randn_like(w)}


def _coarse_kl(lm, tok, texts, bent, top):
    """The exact KL with the original's ``top`` likeliest tokens kept per position and the rest of the
    vocabulary one outcome, from both models' full logits."""
    enc = tok(texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    module = lm.model.layers[1].mlp.down_proj
    w = module.weight.data
    with torch.no_grad():
        p = torch.log_softmax(lm(**enc).logits.double(), -1)[mask]
        module.weight.data = bent[KEY]
        q = torch.log_softmax(lm(**enc).logits.double(), -1)[mask]
        module.weight.data = w
    at = p.topk(top, -1).indices
    pt, qt = p.gather(-1, at), q.gather(-1, at)
    pr, qr = (1 - pt.exp().sum(-1)).clamp(min=0), (1 - qt.exp().sum(-1)).clamp(min=1e-300)
    return float(((pt.exp() * (pt - qt)).sum(-1) + torch.xlogy(pr, pr) - pr * qr.log()).mean())


def test_top_token_kl_is_the_coarse_kl_to_first_order_in_the_rest(peaked, monkeypatch):
    """With 4 of the vocabulary's 256 tokens kept, the candidate's own logits of those tokens are exact
    and only the rest's mass is taken to first order: the measure is the coarse KL within 2%, though
    the rest holds a tenth of the probability (measured: 0.5%; a trained LM's top 256 hold far more)."""
    lm, tok, bent = peaked
    monkeypatch.setattr(cal, "TOP_TOKENS", 4)
    texts = _texts(6)
    meter = OutputMeter(lm, tok, texts, 64, measure="logits")
    assert meter.head is not None  # the hidden-state path, not the plain one
    rest = torch.cat([ref.rest for ref in meter.reference]).exp()
    assert float(rest.mean()) > 0.05  # the rest's first-order mass is exercised, not negligible
    want = _coarse_kl(lm, tok, texts, bent, 4)
    assert want > 1e-3 and meter(bent) == pytest.approx(want, rel=0.02)
    assert meter({}) == pytest.approx(0, abs=1e-9)


def test_a_measurement_applies_the_head_to_no_vocabulary(peaked):
    """The head's full product runs when the reference is made (and once to check it), never per
    candidate: a measurement's cost is the layers', whatever the vocabulary."""
    lm, tok, bent = peaked
    calls = []
    lm.lm_head.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    meter = OutputMeter(lm, tok, _texts(6), 64, measure="logits")
    made = len(calls)
    assert made == 1  # the one check that the model's logits are its head's product
    meter(bent)
    meter({})
    assert len(calls) == made


def test_logits_that_are_not_the_heads_product_are_measured_plainly(peaked):
    """A head that scales its output (as soft-capped or scaled logits do) fails the first batch's check:
    the meter falls back to the full log-softmax and still measures the exact KL."""
    lm, tok, bent = peaked
    texts = _texts(6)
    lm.config.final_logit_softcapping = 30.0  # named in the config: not even tried
    assert OutputMeter(lm, tok, texts, 64, measure="logits").head is None
    lm.config.final_logit_softcapping = None

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(lm.lm_head.in_features, lm.lm_head.out_features, bias=False)
    scaled.weight.data = lm.lm_head.weight.data
    lm.lm_head = scaled
    meter = OutputMeter(lm, tok, texts, 64, measure="logits")
    assert meter.head is None
    vocab = lm.lm_head.out_features
    assert meter(bent) == pytest.approx(_coarse_kl(lm, tok, texts, bent, vocab), rel=1e-4)


def test_a_bf16_model_is_measured_from_its_hidden_states_in_float32(tiny_llama):
    """The head's product runs in float32 whatever the model's dtype, and a bf16 model's own logits
    (3 digits) still pass the check: the shortcut serves it, and the original measures 0."""
    lm, tok = load_model(tiny_llama, head="causal-lm", dtype=torch.bfloat16), load_preprocessor(tiny_llama)
    meter = OutputMeter(lm, tok, _texts(6), 64, measure="logits")
    assert meter.head is not None and meter.head.weight.dtype == torch.float32
    assert meter({}) == pytest.approx(0, abs=1e-9)
    w = lm.model.layers[1].mlp.down_proj.weight.detach()
    assert meter({KEY: w * 1.5}) > 1e-6  # a random head: flat distributions, small KL, but not none
