import copy

import pytest
import torch
from lion_pytorch import Lion as RefLion

from l2o_dynamics.optimizees import ZOO
from l2o_dynamics.optimizers import SGD, Adam, Lion, apply_updates, make_baseline
from l2o_dynamics.errors import L2OError
from l2o_dynamics.seeds import generator
from tolerance import reduction_atol

MODEL = ZOO["sigmoid"]


def data(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.rand(32, 784, generator=g, dtype=dtype), torch.randint(0, 10, (32,), generator=g)


# float64: Lion's sign() is discontinuous, so float32 rounding differences between two
# correct implementations can flip a coordinate's sign and the runs drift apart.
def run_ours(opt, steps=50):
    params = MODEL.init(generator("opt-test"), dtype=torch.float64)
    state = opt.init(params)
    for t in range(steps):
        _, grads, _ = MODEL.loss_and_grad(params, *data(t, torch.float64))
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
    return params


def run_reference(make, steps=50):
    params = {k: v.clone().requires_grad_()
              for k, v in MODEL.init(generator("opt-test"), dtype=torch.float64).items()}
    opt = make(list(params.values()))
    for t in range(steps):
        opt.zero_grad()
        MODEL.loss(params, *data(t, torch.float64)).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


CASES = [
    (SGD(lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (SGD(lr=0.05, momentum=0.8, dampening=0.3),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3)),
    (SGD(lr=0.2, momentum=0.0), lambda p: torch.optim.SGD(p, lr=0.2)),
    (Adam(lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    (Adam(lr=5e-3, betas=(0.8, 0.99), weight_decay=1e-2),
     lambda p: torch.optim.Adam(p, lr=5e-3, betas=(0.8, 0.99), weight_decay=1e-2)),
    (Lion(lr=1e-3), lambda p: RefLion(p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)),
    (Lion(lr=3e-4, weight_decay=0.5), lambda p: RefLion(p, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.5)),
]


@pytest.mark.parametrize("ours,ref", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_matches_reference_implementation_for_50_steps(ours, ref):
    got, want = run_ours(ours), run_reference(ref)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
    start = MODEL.init(generator("opt-test"), dtype=torch.float64)
    assert not torch.allclose(got["fc1.weight"], start["fc1.weight"])  # it did move


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Adam(lr=1e-2), Lion(lr=1e-3)], ids=lambda o: o.name)
def test_update_is_pure(opt):
    params = MODEL.init(generator("pure"))
    state = opt.init(params)
    for t in range(3):  # non-trivial state
        _, grads, _ = MODEL.loss_and_grad(params, *data(t))
        _, state = opt.update(grads, state, params)
    before = copy.deepcopy(state)
    params_before = copy.deepcopy(params)
    _, grads, _ = MODEL.loss_and_grad(params, *data(9))
    u1, s1 = opt.update(grads, state, params)
    u2, s2 = opt.update(grads, state, params)
    for k in u1:
        assert torch.equal(u1[k], u2[k])
    assert _equal(state, before) and _equal(params, params_before)
    assert _equal(s1, s2)
    assert not _equal(s1, before)


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", ["sgd", "adam", "lion"])
def test_per_run_learning_rates_equal_separate_runs(name):
    # float64, as run_ours: Adam divides by sqrt(v) and Lion takes a sign, so float32
    # rounding of tiny gradients (different reduction orders batched vs single, which
    # depend on the thread count) is amplified into update differences of ~lr. The claim
    # is algebraic (a per-run rate equals separate runs); float64 makes it exact to
    # n * eps, where a wrong broadcast of the rates errs by O(lr).
    rates = [1e-3, 1e-2, 1e-1]
    sets = [MODEL.init(generator("lr", i), dtype=torch.float64) for i in range(3)]
    stacked = {k: torch.stack([s[k] for s in sets]) for k in sets[0]}
    opt = make_baseline(name, lr=torch.tensor(rates, dtype=torch.float64))
    state = opt.init(stacked)
    singles = [(make_baseline(name, lr=r), s) for r, s in zip(rates, sets)]
    single_states = [o.init(s) for o, s in singles]
    for t in range(5):
        x, y = data(t, torch.float64)
        _, grads, _ = MODEL.loss_and_grad(stacked, x, y)
        upd, state = opt.update(grads, state, stacked)
        stacked = apply_updates(stacked, upd)
        for i, (o, s) in enumerate(singles):
            _, gi, _ = MODEL.loss_and_grad(s, x, y)
            ui, single_states[i] = o.update(gi, single_states[i], s)
            singles[i] = (o, apply_updates(s, ui))
    for i, (_, s) in enumerate(singles):
        for k in s:  # 5 steps of gradients reduced over 784 x 32 terms of O(1)
            atol = reduction_atol(torch.float64, 5 * 784 * 32, 1.0)
            torch.testing.assert_close(stacked[k][i], s[k], rtol=0, atol=atol)


def test_unknown_optimizer_names_the_valid_ones():
    with pytest.raises(L2OError, match="valid: sgd, adam, lion, l2o"):
        make_baseline("rmsprop")
