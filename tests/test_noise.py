import numpy as np
import pytest
import torch

from l2o_dynamics import noise
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
    assert {"alpha_grad", "alpha_update", "alpha_grad_std", "alpha_update_std", "cov_max_eig",
            "cov_trace"} <= got
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
