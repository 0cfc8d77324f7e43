"""Decompositions every fit is built on: truncated SVD (exact or randomized), whitening by a layer's
input Gram (the output-error view), and applying a rank-r increment."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


# Below this size a float64 LAPACK SVD costs well under a second on a laptop core.
EXACT_SVD_MAX_DIM = 1024


def choose_svd(shape: tuple[int, int], rank: int, method: str) -> str:
    """Exact where it is cheap or the rank is a large share of the matrix; randomised elsewhere."""
    if method != "auto":
        return method
    small = min(shape)
    return "exact" if small <= EXACT_SVD_MAX_DIM or 4 * rank >= small else "randomized"


def truncated_svd(delta: torch.Tensor, rank: int, method: str = "exact", seed: int = 0, niter: int = 4,
                  memo: tuple[dict, str] | None = None):
    """Best rank-``rank`` factors (B, A) of ``delta`` in float32, the singular values split evenly.

    Signs are fixed (each column of B has a positive largest entry) so the output does not depend on
    LAPACK's arbitrary sign choice. ``memo`` = (cache, name) keeps the exact decomposition of the
    matrix called ``name`` in ``cache``, so that fitting it again at another rank truncates it
    instead of decomposing it again (the planner weighing one family's ranks).
    """
    m, n = delta.shape
    if rank == 0:
        return delta.new_zeros((m, 0), dtype=torch.float32), delta.new_zeros((0, n), dtype=torch.float32)
    if method == "exact":
        if memo is None:
            u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        else:
            cache, name = memo
            if name not in cache:
                cache[name] = torch.linalg.svd(delta.double(), full_matrices=False)
            u, s, vh = cache[name]
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    elif method == "randomized":
        q = min(rank + max(10, rank // 2), m, n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta.float(), q=q, niter=niter)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        raise ValueError(f"unknown SVD method {method!r}")
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    sign[sign == 0] = 1
    root = s.sqrt()
    b = (u * (sign * root)).float()
    a = ((sign * root)[:, None] * vh).float()
    return b, a


def apply_increment(ref: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Ŵ = Ŵ_ref + B A in float32, from the factors as stored."""
    if b.shape[1] == 0:
        return ref.clone()
    return torch.addmm(ref, b.float(), a.float())


@dataclass(frozen=True)
class Whitener:
    """S with S Sᵀ = G + δI for a layer's input Gram G = XᵀX (``root``), and S⁻¹ (``inv``).

    Output error on the calibration inputs is ||ΔW S|| for a weight stored (out, in) as nn.Linear
    does (``side`` 1), and ||Sᵀ ΔW|| for one stored (in, out) as GPT-2's Conv1D (``side`` 0).
    The eigendecomposition never fails on a symmetric matrix, unlike Cholesky on a singular Gram;
    the damping δ = ``damping`` × mean eigenvalue keeps unseen input directions from being ignored.
    It is kept as G + δI = Q Λ Qᵀ, the eigenvectors Q and the damped eigenvalues Λ: one n x n matrix,
    not the two that S = QΛ^½ and S⁻¹ = Λ^-½Qᵀ would be (a 7B MLP's is 0.97 GB in float64, not
    1.9); each is made from them when asked for, an O(n²) scaling beside the O(n³) work it serves.
    """

    vectors: torch.Tensor  # Q, float64
    values: torch.Tensor  # Λ, damped: every one at least δ
    side: int
    damping: float = 0.0  # the δ added to every eigenvalue
    _hessian: list = field(default_factory=list, compare=False, repr=False)  # hessian(), once made: the planner
    # rounds a layer by GPTQ for many candidates (its bytes count in nbytes, so the Grams' cache bounds it)
    _gram: list = field(default_factory=list, compare=False, repr=False)  # gram, once made: every whitened
    # mean of a chunk the planner weighs reads it (an n³ product each time: 45 s of SmolLM2's first family)

    @property
    def root(self) -> torch.Tensor:
        return self.vectors * self.values.sqrt()

    @property
    def inv(self) -> torch.Tensor:
        return (self.vectors / self.values.sqrt()).T

    @property
    def gram(self) -> torch.Tensor:
        """G + δI = S Sᵀ (made once, kept)."""
        if not self._gram:
            self._gram.append((self.vectors * self.values) @ self.vectors.T)
        return self._gram[0]

    @property
    def gram_inv(self) -> torch.Tensor:
        """(G + δI)⁻¹."""
        return (self.vectors / self.values) @ self.vectors.T

    @property
    def nbytes(self) -> int:
        own = self.vectors.numel() * self.vectors.element_size() + self.values.numel() * self.values.element_size()
        own += sum(g.numel() * g.element_size() for g in self._gram)
        return own + sum(t.numel() * t.element_size() for t in self._hessian[0][::3]) if self._hessian else own

    @classmethod
    def from_gram(cls, gram: torch.Tensor, side: int, damping: float = 1e-2) -> "Whitener | None":
        g = gram.double()
        g = (g + g.T) / 2
        lam, q = torch.linalg.eigh(g)
        del g
        lam = lam.clamp(min=0)
        scale = float(lam.mean())
        if not scale > 0 or not torch.isfinite(lam).all():
            return None  # no usable signal: the caller falls back to plain SVD
        return cls(q, lam + damping * scale, side, damping * scale)

    def hessian(self) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """(U, order, side, diagonal), what GPTQ rounding reads (quantize.quantize): the inputs in
        order of falling Hessian diagonal (GPTQ's "act order": the most used inputs rounded first,
        while the most columns are left to take their error), U the upper Cholesky factor of
        (G + δI)⁻¹ with rows and columns in that order, and the diagonal of G + δI itself (what
        the scale search weighs each input's error by)."""
        if not self._hessian:
            diagonal = (self.vectors.square() * self.values).sum(1)
            order = torch.argsort(diagonal, descending=True)
            h_inv = self.gram_inv[order][:, order]
            self._hessian.append((torch.linalg.cholesky((h_inv + h_inv.T) / 2, upper=True), order, self.side, diagonal))
        return self._hessian[0]

    def whiten(self, m: torch.Tensor) -> torch.Tensor:
        """M S for a weight stored (out, in), Sᵀ M for Conv1D's (in, out): the output-error view,
        whose Frobenius norm is the error a difference M makes on the calibration inputs."""
        root = self.root.to(m)
        return m @ root if self.side == 1 else root.T @ m

    def output_error(self, w: torch.Tensor, w_hat: torch.Tensor) -> float:
        """||(W - Ŵ) S|| / ||W S||: relative error of the layer's output on calibration inputs."""
        w = w.double()
        den = torch.linalg.norm(self.whiten(w))
        return float(torch.linalg.norm(self.whiten(w - w_hat.double())) / den) if den > 0 else 0.0


def whitened_svd(delta: torch.Tensor, rank: int, whitener: Whitener, method: str = "exact", seed: int = 0,
                 niter: int = 4, memo: tuple[dict, str] | None = None):
    """Rank-``rank`` factors (B, A) minimising the output error ||(ΔW - BA) S||, not ||ΔW - BA||."""
    d = delta if whitener.side == 1 else delta.T
    b, a = truncated_svd(d.double() @ whitener.root, rank, method, seed, niter, memo)
    a = (a.double() @ whitener.inv).float()
    return (b, a) if whitener.side == 1 else (a.T.contiguous(), b.T.contiguous())
