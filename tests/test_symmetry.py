import dataclasses

import pytest
import torch

from l2o_dynamics import symmetry
from l2o_dynamics.learned import L2O, init_phi
from l2o_dynamics.optimizees import ZOO
from l2o_dynamics.optimizers import SGD, Adam, Lion
from l2o_dynamics.runner import meta_test
from l2o_dynamics.errors import L2OError

# BatchNorm's eps breaks the scale symmetry by O(eps/var); the exact statement is for eps = 0.
from l2o_dynamics.seeds import generator
EXACT = {name: dataclasses.replace(m, bn_eps=0.0) for name, m in ZOO.items()}


def _grad(model, dtype, batch=(3,)):
    params = model.init(generator("sym", model.name), batch_shape=batch, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(*batch, 64, 784, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (*batch, 64), generator=g)
    _, grads, _ = model.loss_and_grad(params, x, y)
    return params, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", list(ZOO))
def test_gradients_satisfy_every_symmetry_the_model_has(name, dtype, tol):
    model = EXACT[name]
    params, grads = _grad(model, dtype)
    kinds = symmetry.applicable(model.structure)
    assert "translation" in kinds
    for kind in kinds:
        m = symmetry.measures(kind, grads, params, model.structure)
        assert m["rel"].shape == (3,)
        assert (m["rel"] < tol).all(), (kind, m["rel"])
        c, vn, xn = symmetry.unit_terms(kind, grads, params, model.structure)
        assert ((vn * xn).sum(-1) > 0).all()  # the bound is not trivially zero


def test_which_symmetries_are_claimed():
    assert symmetry.applicable(ZOO["sigmoid"].structure) == ("translation",)
    assert symmetry.applicable(ZOO["leaky_relu"].structure) == ("rescale", "translation")
    assert symmetry.applicable(ZOO["bn_relu"].structure) == ("rescale", "scale", "translation")
    with pytest.raises(L2OError, match="no rescale symmetry"):
        symmetry.measures("rescale", *_grad(ZOO["sigmoid"], torch.float64)[::-1], ZOO["sigmoid"].structure)


def test_sigmoid_gradient_violates_the_rescale_constraint():
    """Evaluate the rescale functional on the sigmoid MLP anyway: it is far from zero, so
    claiming the symmetry would be wrong."""
    model = ZOO["sigmoid"]
    params, grads = _grad(model, torch.float64)
    homogeneous = dataclasses.replace(model.structure, hidden=tuple(
        dataclasses.replace(h, homogeneous=True) for h in model.structure.hidden))
    m = symmetry.measures("rescale", grads, params, homogeneous)
    assert (m["rel"] > 1e-3).all()
    relu_params, relu_grads = _grad(EXACT["relu"], torch.float64)
    assert (symmetry.measures("rescale", relu_grads, relu_params, ZOO["relu"].structure)["rel"] < 1e-12).all()


def test_batchnorm_eps_breaks_scale_symmetry_only_slightly():
    params, grads = _grad(ZOO["bn_relu"], torch.float64)
    rel = symmetry.measures("scale", grads, params, ZOO["bn_relu"].structure)["rel"]
    assert (rel > 1e-12).all() and (rel < 1e-3).all()


@pytest.mark.parametrize("name", ["leaky_relu", "bn_relu", "relu_100x100", "sigmoid_2x20"])
def test_sgd_updates_have_zero_deviation_random_updates_do_not(name):
    model = EXACT[name]
    params, grads = _grad(model, torch.float64)
    sgd = SGD(lr=0.1, momentum=0.0)
    updates, _ = sgd.update(grads, sgd.init(params), params)
    g = torch.Generator().manual_seed(9)
    rand = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    for kind in symmetry.applicable(model.structure):
        upd = symmetry.measures(kind, updates, params, model.structure)
        assert (upd["total"] < 1e-12).all() and (upd["rel"] < 1e-12).all()
        r = symmetry.measures(kind, rand, params, model.structure)
        assert (r["rel"] > 1e-3).all() and (r["total"] > 1e-6).all()
        assert (r["rel"] <= 1 + 1e-12).all()  # Cauchy-Schwarz bound
        assert (r["unit"] >= r["total"] - 1e-12).all()


def test_measures_by_hand_on_a_tiny_layer():
    from l2o_dynamics.optimizees import Optimizee

    tiny = Optimizee("tiny", (2,), "relu", in_features=3, classes=2)
    theta = {"fc1.weight": torch.tensor([[1., 2., 0.], [0., 1., 1.]]), "fc1.bias": torch.tensor([1., -1.]),
             "fc2.weight": torch.tensor([[1., 0.], [2., 1.]]), "fc2.bias": torch.tensor([0., 0.])}
    v = {"fc1.weight": torch.tensor([[1., 0., 0.], [0., 0., 1.]]), "fc1.bias": torch.tensor([1., 4.]),
         "fc2.weight": torch.tensor([[0., 3.], [1., 0.]]), "fc2.bias": torch.tensor([1., 2.])}
    # unit 0: <(1,0,0),(1,2,0)> + 1*1 - <(0,1),(1,2)> = 1 + 1 - 2 = 0
    # unit 1: <(0,0,1),(0,1,1)> + 4*(-1) - <(3,0),(0,1)> = 1 - 4 - 0 = -3
    m = symmetry.measures("rescale", v, theta, tiny.structure)
    assert m["total"].item() == pytest.approx(3.0)
    assert m["unit"].item() == pytest.approx(3.0)
    # |v_0| = sqrt(3), |xi_0| = sqrt(11); |v_1| = sqrt(26), |xi_1| = 2
    assert m["rel"].item() == pytest.approx(3 / (33 ** 0.5 + 2 * 26 ** 0.5), rel=1e-6)
    t = symmetry.measures("translation", v, theta, tiny.structure)
    # output-weight columns sum to 1 and 3, the bias to 3
    assert t["total"].item() == pytest.approx(7.0) and t["unit"].item() == pytest.approx(7.0)


@pytest.mark.parametrize("measure", ["total", "rel"])
def test_deviation_penalty_is_differentiable_in_the_update_only(measure):
    model = ZOO["leaky_relu"]
    params, grads = _grad(model, torch.float64, batch=())
    leaves = {k: (0.01 * g + 0.001).requires_grad_() for k, g in grads.items()}  # an update off the constraint
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    theta = {k: v.detach() for k, v in params.items()}  # as meta-training passes theta_t
    d = symmetry.deviation("all", leaves, theta, model.structure, measure)
    d.backward()
    # the penalty reaches the update ...
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in leaves.values())
    assert sum(float(v.grad.abs().sum()) for v in leaves.values()) > 0
    # ... and not the parameters it is measured at
    assert all(v.grad is None for v in params.values())
    # the gradient is the derivative: central differences (float64, h = 1e-6: error
    # O(h^2 * curvature) + O(eps / h), far below the 1e-6 tolerance) on a few coordinates
    g = torch.Generator().manual_seed(0)
    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        for _ in range(3):
            i = int(torch.randint(leaves[k].numel(), (1,), generator=g))
            h = 1e-6
            vals = []
            for sign in (1, -1):
                shifted = {n: v.detach().clone() for n, v in leaves.items()}
                shifted[k].view(-1)[i] += sign * h
                vals.append(float(symmetry.deviation("all", shifted, theta, model.structure, measure)))
            fd = (vals[0] - vals[1]) / (2 * h)
            assert abs(fd - float(leaves[k].grad.view(-1)[i])) <= 1e-6 * max(1.0, abs(fd)), (k, i)
    with pytest.raises(L2OError, match="valid: total, unit, rel"):
        symmetry.deviation("rescale", leaves, theta, model.structure, "abs")


@pytest.mark.parametrize("make", [lambda: SGD(lr=0.1), lambda: Adam(lr=1e-2), lambda: Lion(lr=1e-3),
                                  lambda: L2O(init_phi(generator("phi")))], ids=["sgd", "adam", "lion", "l2o"])
def test_recording_does_not_change_the_trajectory(make, synthetic):
    model = ZOO["leaky_relu"]
    probe = symmetry.probe(1)
    plain = meta_test(make(), model, synthetic.split("train"), [0, 1], 12)
    recorded = meta_test(make(), model, synthetic.split("train"), [0, 1], 12, probes=[probe])
    loss = lambda log: [v for m, _, v in log.entries if m == "train_loss"]  # noqa: E731
    for a, b in zip(loss(plain), loss(recorded)):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    metrics = {m for m, _, _ in recorded.entries}
    assert {"rescale_deviation", "rescale_deviation_rel", "grad_translation_deviation_unit",
            "rescale_deviation_published", "translation_deviation_published"} <= metrics
    assert "scale_deviation" not in metrics


def _l2o_step(synthetic, steps=3):
    """An L2O with random phi, after a few steps on leaky_relu (one run, float32): the model, the
    L2O, params and state, and the next step's gradient and update."""
    from l2o_dynamics.data import Batcher, stack_batches
    from l2o_dynamics.runner import init_params

    model, l2o = ZOO["leaky_relu"], L2O(init_phi(generator("phi")))
    params = init_params(model, [0])  # (1, ...)
    state = l2o.init(params, batch_ndim=1)
    batchers = [Batcher(*synthetic.split("train"), seed=0)]
    for t in range(steps + 1):
        _, grads, _ = model.loss_and_grad(params, *stack_batches(batchers))
        updates, new_state = l2o.update(grads, state, params)
        if t < steps:
            params, state = {k: params[k] + updates[k] for k in params}, new_state
    return model, l2o, params, state, grads, updates


def test_the_l2os_deviation_as_published_is_its_raw_output_one_over_eta_times_its_steps(synthetic):
    from tolerance import reduction_atol

    model, l2o, params, state, grads, updates = _l2o_step(synthetic)
    raw, _ = dataclasses.replace(l2o, eta=1.0).update(grads, state, params)  # the network's output itself
    published = symmetry.published_update(l2o, grads, updates)
    eps = torch.finfo(torch.float32).eps
    for k in raw:  # (eta * o) / eta = o up to two roundings
        torch.testing.assert_close(published[k], raw[k], rtol=2 * eps, atol=0)
    # each deviation is linear in the vector: 1/eta = 10x the step's, up to the rounding of
    # the P-term sums (terms |o_i| |theta_i|)
    scale = max(float(raw[k].abs().max()) for k in raw) * max(float(params[k].abs().max()) for k in params)
    for kind in symmetry.applicable(model.structure):
        step_dev = symmetry.measures(kind, updates, params, model.structure)["total"]
        raw_dev = symmetry.measures(kind, published, params, model.structure)["total"]
        assert l2o.eta == 0.1 and float(raw_dev) > 0
        assert abs(float(raw_dev) - float(step_dev) / l2o.eta) <= reduction_atol(torch.float32, model.num_params, scale)


def test_sgd_as_published_ignores_its_momentum_and_satisfies_the_constraints():
    # float64: the gradient constraint holds to ~1e-16 relative (test_gradients_satisfy_...)
    model = ZOO["leaky_relu"]
    params, grads = _grad(model, torch.float64, batch=())
    sgd = SGD(lr=0.1, momentum=0.9)
    # an earlier step fills the momentum buffer with a gradient taken at other parameters, which
    # is off the constraints at the new ones
    first, state = sgd.update(grads, sgd.init(params), params)
    params = {k: params[k] + first[k] for k in params}
    g = torch.Generator().manual_seed(5)
    _, g2, _ = model.loss_and_grad(params, torch.rand(64, 784, generator=g, dtype=torch.float64),
                                   torch.randint(0, 10, (64,), generator=g))  # another minibatch's gradient
    updates, _ = sgd.update(g2, state, params)  # -0.1 * (g2 + 0.9 * grads)
    published = symmetry.published_update(sgd, g2, updates)
    for k in params:
        torch.testing.assert_close(published[k], -0.1 * g2[k], rtol=0, atol=0)
    for kind in symmetry.applicable(model.structure):
        assert float(symmetry.measures(kind, published, params, model.structure)["total"]) < 1e-12
    # the real step deviates through its momentum (rescale's generator moves with theta; the
    # translation constraint does not depend on theta, so every sum of gradients keeps it)
    assert float(symmetry.measures("rescale", updates, params, model.structure)["total"]) > 1e-6


@pytest.mark.parametrize("make", [lambda: Adam(lr=1e-2), lambda: Lion(lr=1e-3)], ids=["adam", "lion"])
def test_adam_and_lion_are_measured_as_published_on_their_real_step(make):
    model = ZOO["leaky_relu"]
    params, grads = _grad(model, torch.float64, batch=())
    opt = make()
    updates, _ = opt.update(grads, opt.init(params), params)
    assert symmetry.published_update(opt, grads, updates) is updates
