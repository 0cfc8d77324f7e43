import torch

from vlora_compress.factorise import apply_increment, choose_svd, truncated_svd


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
