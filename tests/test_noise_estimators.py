"""Tail-index estimators against scipy.stats.levy_stable, and the Gram-matrix top
eigenvalue against a dense eigendecomposition of the P x P covariance.

Tolerances come from the estimators' spread, measured over 100 seeds at N = 1e5
(the study's default m = block_size(1e5) = 250): sd of mohammadi is 0.016, 0.025,
0.034, 0.039 at alpha = 1.1, 1.5, 1.8, 2.0, so a single estimate is checked to 0.2
(> 5 sd) and the mean of R = 8 independent estimates to 0.05 (> 3.5 sd).
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import levy_stable

from l2o_dynamics import tail
from l2o_dynamics.errors import L2OError

ALPHAS = [1.1, 1.5, 1.8, 2.0]
N = 100_000
R = 8


@pytest.fixture(scope="module")
def stable():
    """alpha -> (R, N) symmetric alpha-stable samples, scale 1 (about 2 s in all)."""
    return {a: levy_stable.rvs(a, 0.0, size=(R, N), random_state=i) for i, a in enumerate(ALPHAS)}


def lognormal_scales(d, seed):
    return np.exp(2.0 * np.random.default_rng(seed).standard_normal(d))


# -----------------------------------------------------------------------------
# block size


@pytest.mark.parametrize("n, m", [(4, 2), (12, 3), (36, 6), (100, 10), (97, 1), (1000, 25), (100_000, 250)])
def test_block_size_known_values(n, m):
    assert tail.block_size(n) == m


@pytest.mark.parametrize("n", [0, 3, 2.5, True, "100"])
def test_block_size_rejects_bad_n(n):
    with pytest.raises(L2OError, match="n >= 4"):
        tail.block_size(n)


def test_default_m_is_the_studied_divisor_or_isqrt_for_bad_n():
    x = np.random.default_rng(0).standard_normal(N)
    assert tail.mohammadi(x) == tail.mohammadi(x, m=250)
    # 99991 is prime and 99998 = 2 * 49999: block_size gives 1 and 2; fall back to isqrt
    for n in (99_991, 99_998):
        assert tail.mohammadi(x[:n]) == tail.mohammadi(x[:n], m=math.isqrt(n))
        assert abs(tail.mohammadi(x[:n]) - 2.0) < 0.2


@pytest.mark.parametrize("m", [1, 0, N // 2 + 1, 2.5])
def test_mohammadi_rejects_bad_m(m):
    x = np.random.default_rng(0).standard_normal(N)
    with pytest.raises(L2OError, match="block size"):
        tail.mohammadi(x, m=m)


def test_mohammadi_formula_on_a_small_example():
    x = [1.0, 2.0, -3.0, 4.0, 0.0, 0.5, 0.25, 8.0, -1.0, 6.0]  # the 0 is dropped; then K=4, m=2, 1 left over
    kept = [1.0, 2.0, -3.0, 4.0, 0.5, 0.25, 8.0, -1.0]
    sums = [3.0, 1.0, 0.75, 7.0]
    log_mean = lambda v: sum(math.log(abs(t)) for t in v) / len(v)
    inv = (log_mean(sums) - log_mean(kept)) / math.log(2)
    assert tail.mohammadi(x, m=2) == pytest.approx(1 / inv, rel=1e-12)
    assert tail.mohammadi_multi(x, ms=[2]) == pytest.approx(1 / inv, rel=1e-12)


# -----------------------------------------------------------------------------
# Mohammadi estimators on alpha-stable samples


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mohammadi_recovers_levy_stable_alpha(stable, alpha):
    est = np.array([tail.mohammadi(x) for x in stable[alpha]])
    assert abs(est.mean() - alpha) < 0.05, est
    assert np.abs(est - alpha).max() < 0.2, est


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mohammadi_multi_recovers_levy_stable_alpha(stable, alpha):
    # measured sd <= 0.024 at N = 1e5
    est = np.array([tail.mohammadi_multi(x) for x in stable[alpha]])
    assert abs(est.mean() - alpha) < 0.05, est
    assert np.abs(est - alpha).max() < 0.15, est


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mohammadi_std_recovers_levy_stable_alpha(stable, alpha):
    # (2000, 50): m = 40 within each coordinate; measured sd <= 0.024
    est = np.array([tail.mohammadi_std(x.reshape(2000, 50)) for x in stable[alpha]])
    assert abs(est.mean() - alpha) < 0.05, est
    assert np.abs(est - alpha).max() < 0.15, est


def test_mohammadi_pools_row_major_and_takes_tensors(stable):
    x = stable[1.5][0]
    X = x.reshape(-1, 50)
    assert tail.mohammadi(X) == tail.mohammadi(x)
    assert tail.ESTIMATORS["mohammadi"](X) == tail.mohammadi(x)
    assert tail.mohammadi(X.T) != tail.mohammadi(x)
    assert tail.mohammadi(torch.from_numpy(X).float()) == pytest.approx(tail.mohammadi(x.astype(np.float32)), rel=1e-12)


def test_mohammadi_vector_gaussian_is_two():
    # measured sd 0.010 over 30 seeds
    X = np.random.default_rng(1).standard_normal((10_000, 50))
    assert abs(tail.mohammadi_vector(X) - 2.0) < 0.05


def test_mohammadi_vector_with_one_coordinate_is_the_scalar_estimator(stable):
    x = stable[1.1][0]
    assert tail.mohammadi_vector(x[:, None]) == pytest.approx(tail.mohammadi(x), rel=1e-12)
    with pytest.raises(L2OError, match="2-D"):
        tail.mohammadi_vector(x)


# -----------------------------------------------------------------------------
# the pooling pitfall: coordinates on different scales


def test_pooling_gaussian_coordinates_of_lognormal_scales_looks_heavy_tailed():
    s = lognormal_scales(50, seed=0)
    X = np.random.default_rng(10).standard_normal((10_000, 50)) * s
    assert tail.mohammadi(X) < 1.7  # measured 0.8-1.2 over seeds
    assert abs(tail.mohammadi_std(X) - 2.0) < 0.1
    # blocks stay inside one coordinate, so the coordinates' scales cancel
    assert tail.mohammadi_std(X) == pytest.approx(tail.mohammadi_std(X / s), rel=1e-9)


def test_mohammadi_std_heavy_tailed_coordinates_of_lognormal_scales():
    s = lognormal_scales(50, seed=1)
    X = levy_stable.rvs(1.5, 0.0, size=(2000, 50), random_state=11) * s
    assert tail.mohammadi(X) < 1.3  # measured 0.7-1.0 over seeds
    assert abs(tail.mohammadi_std(X) - 1.5) < 0.1  # measured sd 0.012


def test_mohammadi_std_blocks_never_mix_coordinates():
    # half Gaussian, half alpha = 1.1 coordinates: pooling coordinate-major with m | N
    # averages the per-coordinate 1/alpha exactly; blocks across coordinates would not
    s = lognormal_scales(20, seed=2)
    X = np.concatenate([np.random.default_rng(12).standard_normal((2000, 10)),
                        levy_stable.rvs(1.1, 0.0, size=(2000, 10), random_state=12)], axis=1) * s
    per_coordinate = np.mean([1 / tail.mohammadi(X[:, j], m=40) for j in range(20)])
    assert 1 / tail.mohammadi_std(X) == pytest.approx(per_coordinate, rel=1e-9)


def test_standardize_scales_falls_back_and_drops_constant_columns():
    rng = np.random.default_rng(2)
    gauss = 3.0 * rng.standard_normal(20_000)
    sparse = np.zeros(20_000)
    sparse[:5000] = rng.choice([-4.0, 4.0], 5000)  # MAD is 0; mean |x - median| is 1
    X = np.stack([gauss, sparse, np.full(20_000, 7.0), np.zeros(20_000)], axis=1)
    Z = tail.standardize(X)
    assert Z.shape == (20_000, 2) and Z.dtype == np.float64
    lower_median = lambda v: np.sort(v)[(len(v) - 1) // 2]  # noqa: E731 (torch.median's convention)
    assert 1.4826 * lower_median(np.abs(Z[:, 0] - lower_median(Z[:, 0]))) == pytest.approx(1.0)
    assert np.abs(Z[:, 0]).std() == pytest.approx(np.abs(gauss / 3.0).std(), rel=0.05)
    assert np.abs(Z[:, 1]).mean() == pytest.approx(math.sqrt(2 / math.pi))  # scale sqrt(pi/2) * 1
    with pytest.raises(L2OError, match="non-constant"):
        tail.mohammadi_std(X[:, 2:])


# -----------------------------------------------------------------------------
# zeros, degenerate and bad input


def test_exact_zeros_are_dropped_before_blocking():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(N)
    x[rng.random(N) < 0.3] = 0.0
    a = tail.mohammadi(x)
    assert math.isfinite(a) and abs(a - 2.0) < 0.2
    assert a == tail.mohammadi(x[x != 0])
    for f in (tail.mohammadi_multi, tail.hill, lambda v: tail.mohammadi_std(v.reshape(1000, 100))):
        assert math.isfinite(f(x))


def test_sign_like_updates_give_a_finite_estimate():
    x = np.random.default_rng(4).choice([-1.0, 0.0, 1.0], size=N, p=[0.45, 0.1, 0.45])
    a = tail.mohammadi(x)
    assert math.isfinite(a) and a > 1.9  # bounded noise: not heavy-tailed (lattice reads ~2.5)


@pytest.mark.parametrize("name", list(tail.ESTIMATORS))
def test_estimators_reject_nan_and_all_zero(name):
    f = tail.ESTIMATORS[name]
    X = np.random.default_rng(5).standard_normal((100, 10))
    assert math.isfinite(f(X))
    X[3, 4] = np.nan
    with pytest.raises(L2OError, match="nan"):
        f(X)
    with pytest.raises(L2OError):
        f(np.zeros((100, 10)))


# -----------------------------------------------------------------------------
# Hill


def test_hill_on_levy_stable_alpha_1_5(stable):
    # k = round(sqrt(N)) = 316: measured mean 1.513, sd 0.085 over 100 seeds
    est = np.array([tail.hill(x) for x in stable[1.5]])
    assert abs(est.mean() - 1.5) < 0.15, est


def test_hill_on_symmetric_pareto():
    # exact power tail above 1: unbiased up to k/(k-1), sd alpha/sqrt(k) = 0.015
    rng = np.random.default_rng(6)
    x = (rng.pareto(1.5, N) + 1.0) * rng.choice([-1.0, 1.0], N)
    assert abs(tail.hill(x, k=10_000) - 1.5) < 0.06


def test_hill_is_not_a_stable_alpha_near_two(stable):
    # Gaussian tails are not a power law: Hill reads far above 2 (about 11 here)
    assert tail.hill(stable[2.0][0]) > 5.0


@pytest.mark.parametrize("k", [0, N, 1.5])
def test_hill_rejects_bad_k(k):
    with pytest.raises(L2OError, match="hill k"):
        tail.hill(np.random.default_rng(0).standard_normal(N), k=k)


# -----------------------------------------------------------------------------
# top eigenvalue of the update covariance


def dense_reference(U, center):
    U = torch.as_tensor(U, dtype=torch.float64)
    c = U.mean(0) if center is None else torch.as_tensor(center, dtype=torch.float64)
    Uc = U - c
    K = Uc.T @ Uc / U.shape[0]
    return torch.linalg.eigvalsh(K)[-1].item(), torch.trace(K).item()


def random_updates(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(p, generator=g))
    return torch.randn(n, p, generator=g) * scales + 0.3, torch.randn(p, generator=g)


@pytest.mark.parametrize("n, p", [(50, 300), (400, 100), (2100, 40)])
@pytest.mark.parametrize("centered", ["mean", "given"])
def test_top_eigenvalue_gram_matches_dense_covariance(n, p, centered):
    U, c = random_updates(n, p, seed=n + p)
    center = None if centered == "mean" else c
    U0 = U.clone()
    out = tail.top_eigenvalue_gram(U, center=center, chunk=64)
    max_eig, trace = dense_reference(U, center)
    assert out["n"] == n
    assert out["max_eig"] == pytest.approx(max_eig, rel=1e-9)
    assert out["trace"] == pytest.approx(trace, rel=1e-10)
    assert torch.equal(U, U0)


def test_top_eigenvalue_gram_chunking_and_numpy_input_agree():
    U, c = random_updates(130, 77, seed=7)
    ref = tail.top_eigenvalue_gram(U, center=c)
    for chunk in (1, 7, 129, 4096):
        out = tail.top_eigenvalue_gram(U.numpy(), center=c.numpy(), chunk=chunk)
        assert out["max_eig"] == pytest.approx(ref["max_eig"], rel=1e-12)
        assert out["trace"] == pytest.approx(ref["trace"], rel=1e-12)


def test_top_eigenvalue_gram_constant_updates_are_zero():
    out = tail.top_eigenvalue_gram(torch.ones(3000, 5))
    assert out == {"max_eig": 0.0, "trace": 0.0, "n": 3000}


def test_top_eigenvalue_gram_rejects_bad_input():
    U = torch.randn(20, 10)
    with pytest.raises(L2OError, match="2-D"):
        tail.top_eigenvalue_gram(U[0])
    with pytest.raises(L2OError, match="center"):
        tail.top_eigenvalue_gram(U, center=torch.zeros(9))
    with pytest.raises(L2OError, match="chunk"):
        tail.top_eigenvalue_gram(U, chunk=0)
    U[2, 3] = float("inf")
    with pytest.raises(L2OError, match="nan or inf"):
        tail.top_eigenvalue_gram(U)


# -----------------------------------------------------------------------------
# the study's estimator as published


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mohammadi_published_recovers_levy_stable_alpha(stable, alpha):
    # no zeros and N = 1e5 (m = 250): the same estimate as mohammadi up to eps = 2e-16
    est = np.array([tail.mohammadi_published(x) for x in stable[alpha]])
    assert abs(est.mean() - alpha) < 0.05, est
    assert np.abs(est - alpha).max() < 0.2, est
    assert est[0] == pytest.approx(tail.mohammadi(stable[alpha][0]), rel=1e-9)


def test_mohammadi_published_keeps_zeros_and_reads_lighter_tails():
    # 8.4% exact zeros (as MNIST's blank pixels in the gradient noise): each adds
    # log(eps) = -36 to the mean of log|X_i| (about -3 in all) but hardly moves the block
    # sums' mean, so 1/alpha grows by ~3 / log(250): alpha drops from the law's own 2 to ~1.
    rng = np.random.default_rng(6)
    x = rng.standard_normal(N)
    x[rng.random(N) < 0.084] = 0.0
    pub, dropped = tail.mohammadi_published(x), tail.mohammadi(x)
    assert abs(dropped - 2.0) < 0.2
    assert pub < dropped - 0.5
    # the formula by hand: N = 4, m = 2, x = (1, 0, 3, 1), Y = (1, 4);
    # mean log(|Y| + eps) = log(4) / 2, mean log(|x| + eps) = (log eps + log 3) / 4
    eps = np.spacing(1)
    inv = (np.log(4) / 2 - (np.log(eps) + np.log(3)) / 4) / np.log(2)
    assert tail.mohammadi_published(np.array([1.0, 0.0, 3.0, 1.0])) == pytest.approx(1 / inv, rel=1e-12)


def test_mohammadi_published_needs_a_divisor_block_size():
    with pytest.raises(L2OError, match="not prime"):
        tail.mohammadi_published(np.ones(97))
