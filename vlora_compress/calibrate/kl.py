"""Next-token KL at the cost of the layers, not of the vocabulary.

The planner measures a causal LM's candidates by the KL divergence of the next-token distributions
from the original's (calibrate/grams.OutputMeter, measure ``logits``). Done plainly, every
measurement multiplies every held-back position's final hidden state by the whole head and takes a
log-softmax over the vocabulary: on a 270M model with a 262,144-token vocabulary that was half of
planning (issue 38). Here the head is applied once, to the original's hidden states; after that a
candidate costs its layers' forward and, per position, the original's ``top`` likeliest tokens:

- the candidate's logits of those tokens are exact: their head rows times its hidden state;
- the rest of the vocabulary is one outcome, as before, and its mass is taken to first order in the
  change of the hidden state: Σ_rest exp(l_j + δ·w_j) ≥ R exp(δ·m), with R the original's rest mass,
  δ the change of the final hidden state and m the mean head row of the rest weighted by the
  original's probabilities (Jensen), so the normaliser needs no pass over the vocabulary.

With ``top`` at least the vocabulary it is the exact KL. Used only where the model's logits are its
head's matrix product with the base model's last hidden state (checked on two samples against
the model's own logits: soft-capped or scaled logits fall back to the plain measure).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GATHERED = 2**24  # head rows' floats gathered at once, in blocks of positions (64 MB in float32)


@dataclass
class Head:
    """The head as a matrix product: logits = h @ weight.T (+ bias), in float32."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = h @ self.weight.T
        return out + self.bias if self.bias is not None else out

    def rows(self, h: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """The logits of tokens ``at`` (positions x k) only, a block of positions at a time."""
        out = torch.empty(at.shape, dtype=self.weight.dtype, device=h.device)
        step = max(1, GATHERED // max(1, at.shape[1] * h.shape[1]))
        for i in range(0, h.shape[0], step):
            w = self.weight[at[i:i + step]]  # positions x k x d
            out[i:i + step] = torch.bmm(w, h[i:i + step, :, None].to(w.dtype))[..., 0]
        return out + self.bias[at] if self.bias is not None else out


def plain_head(lm) -> Head | None:
    """The model's head as a Linear (no bias or a bias), or None where it is something else."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(lm, "base_model", lm) is lm:
        return None
    cfg = getattr(lm, "config", None)
    if any(getattr(cfg, name, None) not in (None, 1, 1.0) for name in ("final_logit_softcapping", "logit_scale",
                                                                       "logits_scaling")):
        return None
    # in float32 whatever the model's dtype (no copy where it is float32): the KL of nearby candidates
    # differs in digits a bf16 product would round away
    return Head(head.weight.detach().float(), head.bias.detach().float() if head.bias is not None else None)


def agrees(head: Head, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the model's own logits are the head's product with its base model's last hidden state."""
    mine = head.logits(hidden.float())
    tol = max(1e-3, 2 * torch.finfo(logits.dtype).eps)  # a bf16 model's own logits hold 3 digits
    return bool(torch.allclose(mine, logits.float(), rtol=tol, atol=tol * float(logits.abs().max()) + 1e-5))


@dataclass
class TopRef:
    """One batch of the original's next-token distributions, as kept: per position the ``top``
    likeliest tokens (``at``) and their log-probabilities, the log of the rest's mass, the log
    normaliser, the final hidden state and the rest's mean head row."""

    at: torch.Tensor
    top: torch.Tensor
    rest: torch.Tensor
    log_z: torch.Tensor
    hidden: torch.Tensor
    mean_row: torch.Tensor


def reference(head: Head, hidden: torch.Tensor, top: int) -> TopRef:
    """The original's distributions at ``hidden`` (positions x d, float32), the head applied over
    the whole vocabulary a block of positions at a time (this once)."""
    parts = []
    step = max(1, GATHERED // head.weight.shape[0])
    for i in range(0, hidden.shape[0], step):
        h = hidden[i:i + step]
        logits = head.logits(h.float())
        log_z = torch.logsumexp(logits.double(), -1)
        logp = logits.double() - log_z[:, None]
        kept, at = logp.topk(min(top, logp.shape[-1]), dim=-1)
        p = logp.exp().scatter(-1, at, 0.0)  # the rest's probabilities
        mass = p.sum(-1, keepdim=True)
        mean_row = (p.to(head.weight.dtype) @ head.weight).double() / mass.clamp(min=1e-300)
        parts.append((at, kept, log_rest(kept), log_z, h.float(), mean_row.float()))
    return TopRef(*(torch.cat(x) for x in zip(*parts)))


def kl_sum(head: Head, hidden: torch.Tensor, ref: TopRef) -> float:
    """Σ over positions of KL(original || candidate), the candidate's final hidden states ``hidden``."""
    mine = head.rows(hidden, ref.at).double()  # the candidate's logits of the original's top tokens
    shift = ((hidden.double() - ref.hidden.double()) * ref.mean_row.double()).sum(-1)
    rest = ref.log_z + ref.rest + shift  # its rest's log-mass, unnormalised
    log_z = torch.logsumexp(torch.cat([mine, rest[:, None]], -1), -1)
    mine, rest = mine - log_z[:, None], rest - log_z
    p_rest = ref.rest.exp()
    kl = (ref.top.exp() * (ref.top - mine)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * rest
    return float(kl.sum())


def kl_sum_plain(head: Head, hidden: torch.Tensor, ref: TopRef) -> float:
    """kl_sum with the candidate's head applied over the whole vocabulary, a block of positions at
    a time: for a head that is itself replaced (a quantized head or tied embedding), whose change
    the first-order rest mass does not see. Exact for the kept tokens and the rest as one outcome."""
    total = 0.0
    step = max(1, GATHERED // head.weight.shape[0])
    for i in range(0, hidden.shape[0], step):
        logp = torch.log_softmax(head.logits(hidden[i:i + step].float()).double(), -1)
        top, rest = ref.top[i:i + step], ref.rest[i:i + step]
        mine = logp.gather(-1, ref.at[i:i + step])
        p_rest = rest.exp()
        kl = (top.exp() * (top - mine)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * log_rest(mine)
        total += float(kl.sum())
    return total


def log_rest(top: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ p) over the last dimension of log-probabilities ``top``: the log-probability of every
    other token (clamped away from log 0, where the kept tokens hold all the mass)."""
    return torch.log1p(-torch.logsumexp(top, -1).exp().clamp(max=1 - 1e-12))
