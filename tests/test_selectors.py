"""The selector registry: contract (K unique sorted indices, determinism, batching), each criterion,
and bad input."""

import numpy as np
import pytest
import torch
from helpers import clip_like, spectrum_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

from svdprune_utils import SELECTORS, leverage_scores, projection_residual, score_tokens, select_tokens, top_k

ALL = sorted(SELECTORS)


def signals_for(method, N, B=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if B is None else (B, N)
    if method in ("cls_attention", "fastv", "vispruner"):
        return {"attention": torch.rand(shape, generator=g)}
    if method == "cdpruner":
        return {"relevance": torch.rand(shape, generator=g)}
    return {}


def test_registry_has_the_required_methods():
    assert {"svd", "random", "uniform", "norm", "cls_attention", "fastv", "divprune", "pivoted_qr", "vispruner",
            "cdpruner"} <= set(SELECTORS)
    for name, fn in SELECTORS.items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 20, f"{name} needs a docstring with its criterion"


@pytest.mark.parametrize("method", ALL)
@settings(max_examples=12, deadline=None)
@given(N=st.sampled_from([16, 36, 64, 144]), d=st.integers(2, 24), K=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_contract_unique_sorted_deterministic(method, N, d, K, seed):
    X = torch.tensor(np.random.default_rng(seed).standard_normal((N, d)), dtype=torch.float32)
    sig = signals_for(method, N, seed=seed)
    a = select_tokens(X, K, method, **sig)
    b = select_tokens(X, K, method, **sig)
    assert a.dtype == torch.long and a.shape == (min(K, N),)
    assert torch.equal(a, b)
    assert torch.equal(a, torch.sort(a).values) and len(set(a.tolist())) == a.numel()
    assert a.min() >= 0 and a.max() < N


@pytest.mark.parametrize("method", ALL)
def test_batch_equals_each_sample_alone(method):
    X = torch.stack([torch.tensor(clip_like(64, 32, seed=s)) for s in range(3)])
    sig = signals_for(method, 64, B=3)
    batch = select_tokens(X, 10, method, **sig)
    assert batch.shape == (3, 10)
    for b in range(3):
        one = {k: v[b] for k, v in sig.items()}
        assert torch.equal(batch[b], select_tokens(X[b], 10, method, **one))


@pytest.mark.parametrize("method", ALL)
def test_budget_at_least_n_keeps_all_and_bad_budget_raises(method):
    X = torch.tensor(clip_like(36, 8))
    sig = signals_for(method, 36)
    assert torch.equal(select_tokens(X, 36, method, **sig), torch.arange(36))
    assert torch.equal(select_tokens(X, 1000, method, **sig), torch.arange(36))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            select_tokens(X, bad, method, **sig)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", ["constant", "duplicated"])
def test_degenerate_tokens_still_give_k_unique_indices(method, kind):
    base = torch.tensor(clip_like(8, 6, seed=2))
    X = torch.ones(64, 6) if kind == "constant" else base.repeat(8, 1)
    sig = signals_for(method, 64)
    a = select_tokens(X, 16, method, **sig)
    assert len(set(a.tolist())) == 16 and torch.equal(a, select_tokens(X, 16, method, **sig))


@pytest.mark.parametrize("method", ALL)
def test_inputs_not_mutated_and_low_precision_accepted(method):
    X = torch.tensor(clip_like(36, 12, seed=4)).to(torch.bfloat16)
    Xc = X.clone()
    sig = signals_for(method, 36)
    sig_c = {k: v.clone() for k, v in sig.items()}
    idx = select_tokens(X, 9, method, **sig)
    assert idx.shape == (9,)
    assert torch.equal(X, Xc) and all(torch.equal(sig[k], sig_c[k]) for k in sig)
    # numpy input gives the same indices as the equivalent torch input
    as_numpy = np.asarray(X.float())
    assert torch.equal(select_tokens(as_numpy, 9, method, **sig), select_tokens(X.float(), 9, method, **sig))


def test_svd_is_top_k_leverage_at_rank_budget():
    X = clip_like(100, 40, seed=5)
    s = leverage_scores(X, rank=12)
    expected = np.sort(np.argsort(-s, kind="stable")[:12])
    np.testing.assert_array_equal(select_tokens(X, 12, "svd").numpy(), expected)
    s4 = leverage_scores(X, rank=4, center=True)
    np.testing.assert_array_equal(
        select_tokens(X, 12, "svd", rank=4, center=True).numpy(), np.sort(np.argsort(-s4, kind="stable")[:12])
    )


def test_top_k_breaks_ties_towards_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    assert top_k(s, 2).tolist() == [[1, 2]]
    assert top_k(s, 4).tolist() == [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match="NaN"):
        top_k(torch.tensor([[1.0, float("nan")]]), 1)


def test_norm_and_attention_selectors_follow_their_signal():
    X = torch.ones(16, 4)
    X[[3, 9, 14]] *= torch.tensor([5.0, 7.0, 6.0])[:, None]
    assert select_tokens(X, 3, "norm").tolist() == [3, 9, 14]
    att = torch.zeros(16)
    att[[0, 5, 15]] = 1.0
    for m in ("cls_attention", "fastv"):
        assert select_tokens(X, 3, m, attention=att).tolist() == [0, 5, 15]


@pytest.mark.parametrize("method", ["cls_attention", "fastv"])
def test_missing_or_misshaped_signal_is_a_clear_error(method):
    X = torch.ones(16, 4)
    with pytest.raises(ValueError, match="attention"):
        select_tokens(X, 3, method)
    with pytest.raises(ValueError, match=r"shape \(1, 16\)"):
        select_tokens(X, 3, method, attention=torch.ones(15))
    with pytest.raises(ValueError, match="non-finite"):
        select_tokens(X, 3, method, attention=torch.full((16,), float("nan")))


@pytest.mark.parametrize("method", ["cls_attention", "fastv", "vispruner"])
@pytest.mark.parametrize("budget", [16, 1000])
def test_signals_are_checked_when_the_budget_keeps_every_token(method, budget):
    """budget >= N keeps every token, but a missing or misshaped signal is still an error (it used to return
    arange(N) unchecked)."""
    X = torch.ones(16, 4)
    with pytest.raises(ValueError, match="attention"):
        select_tokens(X, budget, method)
    with pytest.raises(ValueError, match=r"shape \(1, 16\)"):
        select_tokens(X, budget, method, attention=torch.ones(3))
    assert torch.equal(select_tokens(X, budget, method, attention=torch.rand(16)), torch.arange(16))


@pytest.mark.parametrize("bad", [torch.arange(16) > 3, torch.ones(16, dtype=torch.complex64), ["a"] * 16, {"a": 1}])
def test_a_signal_must_hold_real_numbers(bad):
    with pytest.raises(ValueError, match="signal `attention`"):
        select_tokens(torch.ones(16, 4), 3, "cls_attention", attention=bad)


@pytest.mark.parametrize("grid", [(-4, -4), 16, (4, 4, 1), (4.0, 4.0), (True, 16), (0, 16), "4x4"])
def test_a_bad_grid_names_the_problem(grid):
    with pytest.raises(ValueError, match="grid must be a pair of integers"):
        select_tokens(torch.ones(16, 4), 4, "uniform", grid=grid)


@pytest.mark.parametrize("kwargs, match", [({"seed": None}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "a"}, "seed"),
                                           ({"seed": -1}, "seed"), ({"generator": 3}, "generator")])
def test_random_checks_its_seed_and_generator(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_tokens(torch.ones(16, 4), 4, "random", **kwargs)


def test_unknown_method_and_signal():
    X = torch.ones(16, 4)
    with pytest.raises(ValueError, match="registered"):
        select_tokens(X, 3, "topk-magic")
    with pytest.raises(TypeError, match="attnetion"):
        select_tokens(X, 3, "cls_attention", attnetion=torch.ones(16))


def test_random_seed_and_generator():
    X = torch.ones(2, 100, 3)
    a = select_tokens(X, 10, "random", seed=1)
    assert torch.equal(a[0], a[1]) and torch.equal(a, select_tokens(X, 10, "random", seed=1))
    assert not torch.equal(a, select_tokens(X, 10, "random", seed=2))
    g = torch.Generator().manual_seed(1)
    b = select_tokens(X, 10, "random", generator=g)
    assert not torch.equal(b[0], b[1])  # samples draw from the generator in turn


def test_uniform_spreads_over_the_grid():
    X = torch.ones(576, 4)
    idx = select_tokens(X, 64, "uniform")
    rows, cols = idx // 24, idx % 24
    assert len(set(rows.tolist())) == 8 and len(set(cols.tolist())) == 8
    assert abs(rows.float().mean().item() - 11.5) < 1 and abs(cols.float().mean().item() - 11.5) < 1
    rect = select_tokens(torch.ones(12 * 30, 2), 40, "uniform", grid=(12, 30))
    assert rect.numel() == 40
    with pytest.raises(ValueError, match="grid"):
        select_tokens(torch.ones(50, 2), 10, "uniform")
    with pytest.raises(ValueError, match="grid"):
        select_tokens(torch.ones(36, 2), 10, "uniform", grid=(5, 6))


def test_pivoted_qr_recovers_an_exactly_low_rank_span():
    X = spectrum_matrix(80, 30, [9, 7, 5, 3, 2, 1], seed=6)
    idx = select_tokens(X, 6, "pivoted_qr")
    assert projection_residual(X, idx) < 1e-12
    # on a noisy matrix pivoted QR beats random at the same K
    Y = clip_like(120, 60, seed=7)
    assert projection_residual(Y, select_tokens(Y, 16, "pivoted_qr")) < projection_residual(Y, select_tokens(Y, 16, "random", seed=0))


def test_divprune_picks_an_outlier_first():
    rng = np.random.default_rng(8)
    X = np.tile(rng.standard_normal((1, 8)), (30, 1)) + 0.01 * rng.standard_normal((30, 8))
    X[17] = -X[17]  # the opposite direction: cosine distance ~2
    assert 17 in select_tokens(X.astype(np.float32), 2, "divprune").tolist()


def _official_divprune(X: torch.Tensor, K: int) -> list[int]:
    """Transcription of the selection loop in vbdi/divprune, LLaVA/llava/model/llava_arch.py, DivPrune():
    D = 1 - cosine similarity; step 0 scores each column by its second-smallest entry (topk(2, smallest)[1]);
    step i > 0 scores each column by its minimum over the rows already selected; argmax; finally sorted."""
    Xn = X / X.norm(dim=1, keepdim=True)
    D = 1.0 - Xn @ Xn.T
    s = []
    for i in range(K):
        scores = torch.topk(D, 2, dim=0, largest=False).values[1, :] if i == 0 else D[torch.tensor(s)].min(dim=0).values
        s.append(int(torch.argmax(scores)))
    return sorted(s)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("N", "d", "K"), [(64, 16, 8), (144, 32, 16), (576, 64, 64)])
def test_divprune_equals_the_official_rule(seed, N, d, K):
    X = torch.as_tensor(np.random.default_rng(seed).standard_normal((N, d)))
    assert select_tokens(X, K, "divprune").tolist() == _official_divprune(X, K)


def test_score_tokens_matches_selection():
    X = torch.tensor(clip_like(49, 10, seed=9))
    s = score_tokens(X, "svd", rank=5)
    torch.testing.assert_close(s, leverage_scores(X, rank=5).float())
    assert torch.equal(top_k(score_tokens(X, "norm")[None], 7)[0], select_tokens(X, 7, "norm"))
    with pytest.raises(ValueError, match="not score-based"):
        score_tokens(X, "divprune")
