import math

import numpy as np
import pytest
import torch

from l2o_dynamics import noise, tail
from l2o_dynamics.learned import L2O, init_phi
from l2o_dynamics.optimizees import ZOO, flatten
from l2o_dynamics.optimizers import SGD, Adam, Lion, tree_index
from l2o_dynamics.runner import init_params, meta_test
from l2o_dynamics.errors import L2OError
from l2o_dynamics.seeds import generator

MODEL = ZOO["leaky_relu"]


def _state_after(opt, synthetic, steps=3, seeds=(0,)):
    """A non-trivial (params, state) of run 0, reached by a few real steps."""
    from l2o_dynamics.data import Batcher, stack_batches

    params = init_params(MODEL, list(seeds))
    state = opt.init(params, batch_ndim=1)
    bs = [Batcher(*synthetic.split("train"), seed=s) for s in seeds]
    for _ in range(steps):
        x, y = stack_batches(bs)
        _, g, _ = MODEL.loss_and_grad(params, x, y)
        u, state = opt.update(g, state, params)
        params = {k: params[k] + u[k] for k in params}
    return tree_index(params, 0), tree_index(state, 0)


def test_minibatch_gradients_equal_a_loop_over_minibatches(synthetic):
    params = MODEL.init(generator("g"))
    x, y = synthetic.split("train")
    G = noise.minibatch_gradients(MODEL, params, x[:1000], y[:1000], batch_size=100, chunk=3)
    assert G.shape == (10, MODEL.num_params)
    for i in (0, 4, 9):
        xb = x[i * 100:(i + 1) * 100].float() / 255
        _, g, _ = MODEL.loss_and_grad(params, xb, y[i * 100:(i + 1) * 100])
        torch.testing.assert_close(G[i], flatten(g), rtol=1e-4, atol=1e-6)


def test_sample_gradients_equal_single_example_autograd(synthetic):
    params = MODEL.init(generator("s"))
    x, y = synthetic.split("train")
    G = noise.sample_gradients(MODEL, params, x[:7], y[:7], chunk=3)
    for i in (0, 6):
        _, g, _ = MODEL.loss_and_grad(params, (x[i:i + 1].float() / 255), y[i:i + 1])
        torch.testing.assert_close(G[i], flatten(g), rtol=1e-4, atol=1e-7)
    with pytest.raises(L2OError, match="BatchNorm"):
        noise.sample_gradients(ZOO["bn_relu"], ZOO["bn_relu"].init(generator("b")), x[:4], y[:4])


@pytest.mark.parametrize("make", [lambda: SGD(lr=0.1), lambda: Adam(lr=1e-2), lambda: Lion(lr=1e-3),
                                  lambda: L2O(init_phi(generator("phi")))], ids=["sgd", "adam", "lion", "l2o"])
def test_updates_at_a_frozen_state_equal_one_by_one_updates(make, synthetic):
    opt = make()
    params, state = _state_after(opt, synthetic)
    x, y = synthetic.split("train")
    G = noise.minibatch_gradients(MODEL, params, x[:640], y[:640])
    U = noise.updates_at(opt, state, params, G, chunk=2)
    from l2o_dynamics.optimizees import unflatten

    for i in (0, 4):
        u, _ = opt.update(unflatten(G[i], params), state, params)
        torch.testing.assert_close(U[i], flatten(u), rtol=1e-5, atol=1e-8)


def test_covariance_top_eigenvalue_matches_dense_eigendecomposition(synthetic):
    tiny = type(MODEL)("tiny", (3,), "leaky_relu")  # 784-3-10: P = 2395
    opt = Adam(lr=1e-2)
    params = tiny.init(generator("c"), dtype=torch.float64)
    state = opt.init(params)
    x, y = synthetic.split("train")
    x, y = x[:1280], y[:1280]  # 10 minibatches
    for center in ("mean", "fullbatch"):
        res = noise.update_covariance(opt, tiny, params, state, (x, y), n=6, center=center)
        # dense reference: the same 6 minibatches, P x P covariance
        g = generator("covariance", 0, 0)
        pick = torch.randperm(10, generator=g)[:6]
        idx = (pick[:, None] * 128 + torch.arange(128)).reshape(-1)
        G = noise.minibatch_gradients(tiny, params, x[idx], y[idx])
        U = noise.updates_at(opt, state, params, G)
        c = U.mean(0) if center == "mean" else noise.updates_at(
            opt, state, params, noise.full_batch_gradient(tiny, params, x, y)[None])[0]
        K = (U - c).T @ (U - c) / U.shape[0]
        dense = torch.linalg.eigvalsh(K)
        assert res["cov_max_eig"] == pytest.approx(dense[-1].item(), rel=1e-6)
        assert res["cov_trace"] == pytest.approx(torch.trace(K).item(), rel=1e-6)


@pytest.mark.parametrize("make", [lambda: Adam(lr=1e-2), lambda: L2O(init_phi(generator("phi")))],
                         ids=["adam", "l2o"])
def test_analysis_does_not_disturb_the_run(make, synthetic):
    train = synthetic.split("train")
    small = (train[0][:1280], train[1][:1280])
    probe = noise.noise_probe(small, [0, 1], every=3)
    plain = meta_test(make(), MODEL, train, [0, 1], 7)
    analysed = meta_test(make(), MODEL, train, [0, 1], 7, probes=[probe])
    a = [v for m, _, v in plain.entries if m == "train_loss"]
    b = [v for m, _, v in analysed.entries if m == "train_loss"]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    got = {m for m, _, _ in analysed.entries}
    assert {"alpha_grad", "alpha_update", "alpha_grad_std", "alpha_update_std", "alpha_update_pub",
            "alpha_update_pub_published", "cov_max_eig", "cov_trace"} <= got
    steps = sorted({s for m, s, _ in analysed.entries if m == "alpha_update"})
    assert steps == [0, 3, 6]
    alphas = [v for m, _, v in analysed.entries if m.startswith("alpha")]
    assert all(np.isfinite(v).all() and (np.asarray(v) > 0).all() for v in alphas)


def test_columns_that_do_not_vary_are_exact_zeros_in_the_noise():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g)
    X[:, 1] = 3.0  # a dead coordinate
    X[:, 2] = 0.25 + 1e-9 * torch.randn(50, generator=g)  # constant up to rounding
    C = noise.centred(X)
    assert (C[:, 1] == 0).all() and (C[:, 2] == 0).all()
    torch.testing.assert_close(C[:, [0, 3, 4, 5]], (X - X.mean(0))[:, [0, 3, 4, 5]])


def _constant_coordinates(N=469, P=100, dead=8):
    """N samples of P coordinates, float32: Gaussian noise (sd 0.01) except the first `dead`
    (8%) coordinates, which hold 0.1 (not representable in float32) in every sample, as an
    L2O's update does on always-blank pixels."""
    g = torch.Generator().manual_seed(0)
    X = 0.01 * torch.randn(N, P, generator=g)
    X[:, :dead] = 0.1
    return X


def test_float32_centring_leaves_rounding_residue_where_exact_centring_gives_zeros():
    X = _constant_coordinates()
    plain, exact = noise.centred_as_published(X), noise.centred(X)
    assert (exact[:, :8] == 0).all()
    # the float32 mean of 469 copies of 0.1f is off by rounding: nonzero residue, within the
    # error bound of a 469-term float32 sum of terms 0.1 (469 * eps32 * 0.1 = 5.6e-6)
    residue = plain[:, :8].abs()
    assert (residue > 0).all() and (residue <= 469 * torch.finfo(torch.float32).eps * 0.1).all()
    torch.testing.assert_close(plain[:, 8:], exact[:, 8:], rtol=0, atol=0)  # elsewhere the same


def test_the_residue_raises_the_published_estimators_alpha():
    X = _constant_coordinates()
    plain, exact = noise.centred_as_published(X), noise.centred(X)
    # N = 46,900 samples, m = block_size = 175. Exact: the 8% zeros add 0.08 * log(eps) to the
    # mean of log(|x| + eps); float32: 0.08 * mean log(|r| + eps) with r ~ 1.5e-8 instead, a
    # difference of 0.08 * (-18.0 + 36.0) = 1.44. The block sums of 175 values (~0.12) do not
    # feel either, so 1/alpha drops by 1.44 / log 175 = 0.279 (alpha 1.03 -> 1.44).
    eps = tail.PUBLISHED_EPS
    shift = 0.08 * float((plain[:, :8].double().abs() + eps).log().mean() - math.log(eps))
    a_plain, a_exact = tail.mohammadi_published(plain), tail.mohammadi_published(exact)
    assert 1 / a_exact - 1 / a_plain == pytest.approx(shift / math.log(175), rel=1e-3)
    assert a_plain > a_exact + 0.3


def test_each_estimator_reads_the_centring_it_is_recorded_under():
    G = _constant_coordinates()
    G[:, :8] = 0.0  # gradients on blank pixels: exact zeros under either centring
    U = _constant_coordinates()
    U[:, 8:] *= 1 + torch.rand(U.shape[0], U.shape[1] - 8, generator=torch.Generator().manual_seed(1))  # != G
    out = noise.noise_alphas(G, U)
    assert set(out) == {f"alpha_{w}{s}" for w in ("grad", "update")
                        for s in ("_pub", "_pub_published", "", "_std")}
    # the study's estimator: exact centring under its own name, float32 centring as published
    assert out["alpha_update_pub"] == tail.mohammadi_published(noise.centred(U))
    assert out["alpha_update_pub_published"] == tail.mohammadi_published(U - U.mean(0))
    assert out["alpha_update_pub_published"] > out["alpha_update_pub"] + 0.2  # the residue (test above)
    assert out["alpha_update"] == tail.mohammadi(noise.centred(U))
    assert out["alpha_update_std"] == tail.mohammadi_std(noise.centred(U))
    assert out["alpha_grad_pub_published"] == out["alpha_grad_pub"]  # exact zeros either way
    assert not any(k.endswith("_published") for k in noise.noise_alphas(G, U, published=False))
