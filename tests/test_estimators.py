"""The meta-gradient estimators (estimators.py) against exact references, in float64 on small
problems: the Gaussian-smoothed gradient of a quadratic and of a cosine, the exact gradient of a
whole run's meta-loss (autograd through every step, second order included), and the batched
population against one L2O per phi."""
import math

import pytest
import torch

from l2o_dynamics import estimators as E
from l2o_dynamics import optimizees
from l2o_dynamics.errors import L2OError
from l2o_dynamics.learned import L2O, init_phi
from l2o_dynamics.meta import meta_train, recipe
from l2o_dynamics.optimizees import Optimizee
from l2o_dynamics.optimizers import tree_tensors

D = torch.float64
TINY = Optimizee("tiny", (3,), "leaky_relu", in_features=4, classes=3)  # 27 parameters
Z = 5.0  # |mean - reference| / standard error beyond this: a real difference (p < 1e-5 per coordinate)


def _phi(hidden=2, layers=1, seed=0):
    return init_phi(torch.Generator().manual_seed(seed), hidden, layers, D)


def _flat(tree):
    return torch.cat([v.reshape(-1) for v in tree.values()])


def _z_scores(samples, reference):
    """|mean - reference| / standard error per coordinate; samples (R, d)."""
    se = samples.std(0, unbiased=True) / math.sqrt(len(samples))
    return (samples.mean(0) - reference).abs() / se


# ---- the antithetic estimate on functions whose smoothed gradient is known ---------------------
def _es_samples(f, phi, pairs, sigma, repeats, seed=0):
    """`repeats` independent antithetic estimates of grad E[f(phi + eps)], each from `pairs` pairs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        eps = E.perturb(phi, (pairs, 1), sigma, gen)
        pop = E.antithetic(phi, eps)  # {k: (2N, 1, ...)}
        values = f(pop)  # (2N, 1)
        out.append(_flat(E.es_gradient(eps, values[:pairs] - values[pairs:], sigma)))
    return torch.stack(out)


def test_es_on_a_quadratic_equals_its_smoothed_gradient_which_is_the_exact_one():
    g = torch.Generator().manual_seed(1)
    phi = {"a": torch.randn(5, generator=g, dtype=D), "b": torch.randn(2, 3, generator=g, dtype=D)}
    a = torch.rand(11, generator=g, dtype=D) * 3 + 0.5
    m = torch.randn(11, 11, generator=g, dtype=D) * 0.3
    quad = lambda v: (a * v ** 2).sum(-1) + (v @ m * v).sum(-1) + v.sum(-1)  # noqa: E731
    f = lambda pop: quad(torch.cat([pop["a"], pop["b"].flatten(2)], dim=-1))  # noqa: E731
    x = _flat(phi)
    exact = 2 * a * x + (m + m.T) @ x + 1  # a quadratic's Gaussian smoothing only adds a constant
    samples = _es_samples(f, phi, pairs=64, sigma=0.3, repeats=200)
    assert _z_scores(samples, exact).max() < Z
    assert _z_scores(samples, 1.3 * exact).max() > Z  # the interval is tight enough to mean something


def test_es_estimates_the_gaussian_smoothed_gradient_not_the_raw_one():
    phi = {"x": torch.linspace(-2.0, 2.5, 7, dtype=D)}
    sigma = 0.8
    f = lambda pop: torch.cos(pop["x"]).sum(-1)  # noqa: E731
    smoothed = -torch.sin(phi["x"]) * math.exp(-sigma ** 2 / 2)  # d/dx E[cos(x + e)], e ~ N(0, sigma^2)
    samples = _es_samples(f, phi, pairs=64, sigma=sigma, repeats=400)
    assert _z_scores(samples, smoothed).max() < Z
    assert _z_scores(samples, -torch.sin(phi["x"])).max() > Z


def test_antithetic_pairs_cancel_even_order_terms_exactly():
    phi = {"x": torch.zeros(6, dtype=D)}
    even = lambda v: (v ** 2).sum(-1) + 3 * (v ** 2).sum(-1) ** 2 + (v[..., 0] * v[..., 1]) ** 2  # noqa: E731
    f = lambda pop: even(pop["x"])  # noqa: E731
    samples = _es_samples(f, phi, pairs=8, sigma=0.5, repeats=5)
    assert torch.equal(samples, torch.zeros_like(samples))
    # one-sided differences f(phi + eps) - f(phi) do not cancel them
    eps = E.perturb(phi, (8, 1), 0.5, torch.Generator().manual_seed(0))
    one_sided = _flat(E.es_gradient(eps, 2 * (f({"x": eps["x"]}) - f(phi)), 0.5))
    assert one_sided.abs().max() > 0.1


# ---- the batched population ------------------------------------------------------------------
def test_population_update_equals_one_l2o_per_phi():
    shapes = TINY.shapes()
    phis = [_phi(hidden=3, layers=2, seed=s) for s in range(4)]
    g = torch.Generator().manual_seed(5)
    grads = [{k: torch.randn(s, generator=g, dtype=D) * 10.0 ** (i - 3) for k, s in shapes.items()}
             for i in range(4)]
    net = L2O(phis[0], hidden=3, layers=2)
    states = [net.init(grads[i]) for i in range(4)]
    for st in states:  # nonzero LSTM states
        st["h"] = tuple(torch.rand(t.shape, generator=g, dtype=D) for t in st["h"])
        st["c"] = tuple(torch.randn(t.shape, generator=g, dtype=D) for t in st["c"])
    singles = [L2O(phis[i], hidden=3, layers=2).update(grads[i], states[i]) for i in range(4)]
    stack = lambda trees: {k: torch.stack([t[k] for t in trees]) for k in trees[0]}  # noqa: E731
    state = {"h": [torch.stack([s["h"][l] for s in states]) for l in range(2)],
             "c": [torch.stack([s["c"][l] for s in states]) for l in range(2)]}
    updates, new = E.population_update(net, stack(phis), stack(grads), state, shapes)
    for i, (u, s) in enumerate(singles):
        for k in shapes:
            torch.testing.assert_close(updates[k][i], u[k], rtol=1e-12, atol=1e-14)
        for layer in range(2):
            torch.testing.assert_close(new["h"][layer][i], s["h"][layer], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(new["c"][layer][i], s["c"][layer], rtol=1e-12, atol=1e-14)


# ---- PES is unbiased over a whole run; TBPTT is not -------------------------------------------------
HORIZON, K = 6, 2


def _task():
    g = torch.Generator().manual_seed(11)
    params = TINY.init(g, dtype=D)
    batches = [(torch.rand(8, 4, generator=g, dtype=D) * 2 - 1, torch.randint(0, 3, (8,), generator=g))
               for _ in range(HORIZON + 1)]
    return params, batches


def _factory(b, run):
    params, batches = _task()
    return params, iter(batches)


def _diff_preprocess(g, p=10.0):
    """The L2O's gradient preprocessing, differentiable in g (the library detaches it)."""
    big = g.abs() >= math.exp(-p)
    first = torch.where(big, torch.log(g.abs().clamp_min(math.exp(-p))) / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], dim=-1)


def _exact_run_gradient(phi, hidden=2, eta=0.1, steps=HORIZON, last=False, beta=0.0):
    """d/dphi sum_{t=1..steps} L(theta_t; batch_t), autograd through the whole run: every optimizee
    gradient g_t a function of theta_t (create_graph), torch's own LSTM cell. With beta, plus
    beta x the rescale deviation |sum_k <u_k, xi_k(theta)>| of each update u at the parameters
    theta it is applied to (written out for TINY's one hidden layer, theta not detached)."""
    params, batches = _task()
    leaves = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    names = list(theta)
    loss = TINY.loss(theta, *batches[0])
    grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=True)
    n = sum(v.numel() for v in theta.values())
    h, c = torch.zeros(n, hidden, dtype=D), torch.zeros(n, hidden, dtype=D)
    total = 0.0
    for t in range(1, steps + 1):
        x = _diff_preprocess(torch.cat([gr.reshape(-1) for gr in grads]))
        h, c = torch.lstm_cell(x, (h, c), leaves["lstm0.weight_ih"], leaves["lstm0.weight_hh"],
                               leaves["lstm0.bias_ih"], leaves["lstm0.bias_hh"])
        u = eta * (h @ leaves["out.weight"].T + leaves["out.bias"]).reshape(-1)
        i, new = 0, {}
        for k in names:
            new[k] = theta[k] + u[i:i + theta[k].numel()].reshape(theta[k].shape)
            i += theta[k].numel()
        if beta:
            dot = lambda k: ((new[k] - theta[k]) * theta[k]).sum()  # noqa: E731
            total = total + beta * (dot("fc1.weight") + dot("fc1.bias") - dot("fc2.weight")).abs()
        theta = new
        loss = TINY.loss(theta, *batches[t])
        grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=True)
        total = loss if last else total + loss
    return _flat(dict(zip(leaves, torch.autograd.grad(total, list(leaves.values())))))


def _run_estimates(kind, phi, pairs=1, sigma=1e-3, seed=0):
    """The sum of the estimates over one run's HORIZON / K truncations."""
    s = E.Settings(estimator=kind, tasks=1, unroll=K, horizon=HORIZON, offsets=False, pairs=pairs, sigma=sigma,
                   meta_loss="sum")
    est = E.make(s, L2O(phi, hidden=2, layers=1), TINY, _factory, torch.Generator().manual_seed(seed), D)
    return sum(_flat(est.estimate(phi).grad) for _ in range(HORIZON // K))


def test_pes_is_unbiased_for_the_whole_run_gradient_where_tbptt_is_biased():
    phi = _phi()
    exact = _exact_run_gradient(phi)
    samples = torch.stack([_run_estimates("pes", phi, pairs=100, seed=s) for s in range(40)])
    z = _z_scores(samples, exact)
    assert z.max() < Z, z
    tbptt = _run_estimates("tbptt", phi)
    assert _z_scores(samples, tbptt).max() > 2 * Z  # far outside PES's interval around the exact gradient
    assert torch.linalg.vector_norm(tbptt - exact) > 0.1 * torch.linalg.vector_norm(exact)


def test_truncated_es_equals_the_exact_gradient_of_its_truncations_meta_loss():
    phi = _phi()
    exact = _exact_run_gradient(phi, steps=K)  # the first truncation: L(theta_1) + .. + L(theta_K)
    s = E.Settings(estimator="es", tasks=1, unroll=K, horizon=HORIZON, offsets=False, pairs=100, sigma=1e-3,
                   meta_loss="sum")
    samples = torch.stack([_flat(E.make(s, L2O(phi, hidden=2, layers=1), TINY, _factory,
                                        torch.Generator().manual_seed(r), D).estimate(phi).grad)
                           for r in range(40)])
    assert _z_scores(samples, exact).max() < Z


def _full_es_samples(phi, **settings):
    s = E.Settings(estimator="full-es", tasks=1, horizon=HORIZON, pairs=100, sigma=1e-3, **settings)
    return torch.stack([_flat(E.make(s, L2O(phi, hidden=2, layers=1), TINY, _factory,
                                     torch.Generator().manual_seed(r), D).estimate(phi).grad) for r in range(40)])


@pytest.mark.parametrize("loss", ["mean", "last"])
def test_full_es_equals_the_exact_gradient_of_the_whole_runs_mean_or_last_loss(loss):
    phi = _phi()
    exact = _exact_run_gradient(phi, last=loss == "last") / (HORIZON if loss == "mean" else 1)
    samples = _full_es_samples(phi, full_es_loss=loss)
    assert _z_scores(samples, exact).max() < Z
    assert _z_scores(samples, 1.3 * exact).max() > Z


def test_full_es_with_sign_estimates_the_normalised_gradient_direction():
    # for small sigma, E[eps sign(eps . g)] = sigma sqrt(2 / pi) g / |g|, so the estimate's mean
    # is sqrt(2 / pi) / (2 sigma) g / |g|
    phi = _phi()
    exact = _exact_run_gradient(phi) / HORIZON
    expected = math.sqrt(2 / math.pi) / (2 * 1e-3) * exact / torch.linalg.vector_norm(exact)
    samples = _full_es_samples(phi, sign=True)
    assert _z_scores(samples, expected).max() < Z
    assert _z_scores(samples, 1.3 * expected).max() > Z


# ---- PES bookkeeping --------------------------------------------------------------------------
def test_pes_accumulator_holds_the_runs_perturbations_and_resets_when_its_run_ends():
    phi = _phi()
    s = E.Settings(estimator="pes", tasks=2, unroll=K, horizon=HORIZON, offsets=True, pairs=3, sigma=0.01)
    gen = torch.Generator().manual_seed(4)
    est = E.make(s, L2O(phi, hidden=2, layers=1), TINY, _factory, gen, D)
    expected = {k: torch.zeros(3, 2, *v.shape, dtype=D) for k, v in phi.items()}
    resets = 0
    for _ in range(8):
        replay = torch.Generator().manual_seed(0)
        replay.set_state(gen.get_state())
        eps = E.perturb(phi, (3, 2), 0.01, replay)
        before = list(est.tasks.runs)
        est.estimate(phi)
        for b in range(2):
            if est.tasks.runs[b] != before[b]:  # the run ended: its accumulator is zero again
                resets += 1
                for k in phi:
                    expected[k][:, b] = 0
                    assert torch.equal(est.accum[k][:, b], torch.zeros_like(est.accum[k][:, b]))
            else:
                for k in phi:
                    expected[k][:, b] += eps[k][:, b]
                    torch.testing.assert_close(est.accum[k][:, b], expected[k][:, b], rtol=0, atol=1e-15)
    assert resets >= 4  # 8 truncations of 2 steps, runs of 6: each task's run ended at least twice


@pytest.mark.parametrize("family", ["lstm", "mlp"])
@pytest.mark.parametrize("kind, reg", [("es", None), ("pes", None), ("pes", "rescale"), ("full-es", None)])
def test_copies_advanced_in_groups_give_what_advancing_all_at_once_gives(monkeypatch, kind, reg, family):
    """Tasks.advance runs the copies in cache-sized groups (COPY_GROUP_COORDS), SEGMENT steps at a
    time: every estimate, metric and state after three meta-steps equals the one of all copies
    at once."""
    from l2o_dynamics.mlp_lopt import MLPL2O, init_mlp_phi

    phi = _phi() if family == "lstm" else init_mlp_phi(torch.Generator().manual_seed(0), hidden=4, dtype=D)
    net = L2O(phi, hidden=2, layers=1) if family == "lstm" else MLPL2O(phi, hidden=4)
    s = E.Settings(estimator=kind, tasks=2, unroll=K, horizon=HORIZON, offsets=kind != "full-es", pairs=3,
                   sigma=0.01, reg=reg, beta=0.5 if reg else 0.0)
    runs = {}
    # all at once; one copy per group; two per group, 4 steps at a time (full-es: two segments)
    for coords, segment in ((1 << 30, 20), (1, 20), (2 * TINY.num_params, 4)):
        monkeypatch.setattr(E, "COPY_GROUP_COORDS", coords)
        monkeypatch.setattr(E, "SEGMENT", segment)
        est = E.make(s, net, TINY, _factory, torch.Generator().manual_seed(4), D)
        runs[coords] = [est.estimate(phi) for _ in range(3)], est.tasks
    (ref, tasks), others = runs[1 << 30], [runs[c] for c in (1, 2 * TINY.num_params)]
    # Equal up to rounding: an element-wise kernel may take its vectorised or its scalar path for
    # an element depending on the tensor's size (ulps, then carried through the steps; ES divides
    # F's by sigma in the gradient). A copy mixed up with another would differ by O(1).
    tol = dict(rtol=1e-9, atol=1e-12)
    for estimates, other in others:
        for a, b in zip(ref, estimates):
            for field in ("meta_loss", "reg_loss", "drift", "unroll_loss"):
                torch.testing.assert_close(getattr(b, field), getattr(a, field), **tol)
            for k in a.grad:
                torch.testing.assert_close(b.grad[k], a.grad[k], rtol=1e-9, atol=1e-9 * abs(a.meta_loss) / s.sigma)
        for x, y in zip(tree_tensors((tasks.params, tasks.grads, tasks.state, tasks.loss0)),
                        tree_tensors((other.params, other.grads, other.state, other.loss0))):
            torch.testing.assert_close(y, x, **tol)


# ---- the symmetry penalty inside the ES family's objective ------------------------------------------
@pytest.mark.parametrize("kind", ["es", "pes"])
def test_a_penalised_truncation_has_tbptts_meta_loss_penalty_included(kind):
    """The unperturbed copy (es), or the antithetic mean at a tiny sigma (pes), of the first
    truncation's objective equals `meta.unroll`'s meta-loss with the same penalty, run by TBPTT."""
    phi = _phi(hidden=3)
    net = L2O(phi, hidden=3, layers=1)
    common = dict(tasks=1, unroll=K, horizon=HORIZON, offsets=False, pairs=2, sigma=1e-8, reg="rescale",
                  beta=0.7)
    ref = E.make(E.Settings(estimator="tbptt", **common), net, TINY, _factory, torch.Generator(), D).estimate(phi)
    est = E.make(E.Settings(estimator=kind, **common), net, TINY, _factory, torch.Generator().manual_seed(3),
                 D).estimate(phi)
    assert ref.reg_loss > 1e-3 * abs(ref.meta_loss)  # the penalty is a real part of the objective
    tol = dict(rtol=1e-12, atol=0) if kind == "es" else dict(rtol=1e-9, atol=0)  # pes: O(sigma) copies
    torch.testing.assert_close(est.meta_loss, ref.meta_loss, **tol)
    torch.testing.assert_close(est.reg_loss, ref.reg_loss, **tol)
    plain = E.make(E.Settings(estimator="tbptt", **{**common, "beta": 0.0}), net, TINY, _factory,
                   torch.Generator(), D).estimate(phi)
    torch.testing.assert_close(ref.meta_loss - plain.meta_loss, ref.reg_loss, rtol=1e-12, atol=0)


def test_penalised_es_estimates_the_gradient_of_the_penalised_objective():
    """ES on the penalised truncation equals the exact gradient of TBPTT's penalised meta-loss
    within its sampling interval (the penalty's path included; both 'sum' meta-losses)."""
    phi = _phi()
    common = dict(tasks=1, unroll=K, horizon=HORIZON, offsets=False, meta_loss="sum", reg="rescale", beta=2.0)
    net = L2O(phi, hidden=2, layers=1)
    s = E.Settings(estimator="es", pairs=100, sigma=1e-3, **common)
    samples = torch.stack([_flat(E.make(s, net, TINY, _factory, torch.Generator().manual_seed(r), D)
                                 .estimate(phi).grad) for r in range(40)])
    assert _z_scores(samples, _exact_run_gradient(phi, steps=K, beta=2.0)).max() < Z
    # the penalty's part is large next to the losses' here: without it, far outside the interval
    assert _z_scores(samples, _exact_run_gradient(phi, steps=K)).max() > 2 * Z


# ---- meta-training with them ------------------------------------------------------------------------
SMALL = Optimizee("small", (2,), "leaky_relu")  # 784 -> 2 -> 10: 1,600 parameters


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(optimizees.ZOO, "small", SMALL)


def _cfg(**kw):
    base = dict(optimizee="small", epochs=3, runs=1, horizon=20, unroll=5, val_runs=1, meta_lr=1e-2,
                seed=7, estimator="pes", pairs=2, tasks=2)
    base.update(kw)
    return recipe("plain", **base)


def test_pes_meta_training_resumed_after_a_stop_equals_an_uninterrupted_one(tmp_path, synthetic, small):
    cfg = _cfg(horizon_min=10)
    full = meta_train(cfg, tmp_path / "full", data=synthetic, progress=False)
    meta_train(cfg, tmp_path / "cut", data=synthetic, progress=False, stop_after_epochs=1)
    assert not (tmp_path / "cut" / "l2o.pt").exists()
    resumed = meta_train(cfg, tmp_path / "cut", data=synthetic, progress=False, resume=True)
    for k in full.l2o.phi:
        assert torch.equal(full.l2o.phi[k], resumed.l2o.phi[k]), k
    assert (tmp_path / "full" / "metrics.csv").read_bytes() == (tmp_path / "cut" / "metrics.csv").read_bytes()


@pytest.mark.parametrize("estimator", ["es", "full-es"])
def test_es_meta_training_logs_the_health_metrics_at_every_meta_step(synthetic, small, estimator):
    cfg = _cfg(estimator=estimator, epochs=1, tasks=1)
    res = meta_train(cfg, data=synthetic, progress=False)
    steps = cfg.total_meta_steps()
    assert steps == (1 if estimator == "full-es" else 4)
    for metric in ("meta_loss", "unroll_loss", "meta_grad_norm", "drift", "dead_frac"):
        values = [v for m, _, v in res.log.entries if m == metric]
        assert len(values) == steps and all(math.isfinite(v) for v in values), metric
    assert any(not torch.equal(res.l2o.phi[k], _cfg_phi0(cfg)[k]) for k in res.l2o.phi)


@pytest.mark.parametrize("estimator", ["es", "pes", "full-es"])
def test_es_meta_training_with_a_symmetry_penalty_logs_it(synthetic, small, estimator):
    cfg = _cfg(estimator=estimator, epochs=1, tasks=1, reg="rescale", beta=0.5)
    res = meta_train(cfg.validate(), data=synthetic, progress=False)
    values = [v for m, _, v in res.log.entries if m == "reg_loss"]
    assert len(values) == cfg.total_meta_steps() and all(math.isfinite(v) and v > 0 for v in values)


def _cfg_phi0(cfg):
    from l2o_dynamics.seeds import generator
    return init_phi(generator("phi", cfg.seed), cfg.hidden, cfg.layers)


@pytest.mark.parametrize("change, message", [
    (dict(pairs=0), "pairs must be an integer in 1..100000, got 0"),
    (dict(sigma=0.0), "sigma must be a finite number in [1e-08, 100], got 0.0"),
    (dict(sigma=float("nan")), "sigma must be a finite number"),
    (dict(sigma=float("inf")), "sigma must be a finite number"),
    (dict(unroll=40), "unroll (40) must be at most horizon (20)"),
    (dict(estimator="reinforce"), "unknown estimator 'reinforce'; valid: tbptt, es, pes, full-es"),
    (dict(horizon_min=3), "horizon_min (3) must be in 5..horizon (20)"),
    (dict(full_es_loss="median"), "unknown full_es_loss 'median'; valid: mean, last"),
    (dict(short_runs=0.5), "estimator pes does not support short_runs"),
])
def test_bad_estimator_settings_are_refused_with_one_line(small, change, message):
    with pytest.raises(L2OError) as e:
        _cfg(**change).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_default_recipe_with_an_es_estimator_says_which_recipe_to_use():
    with pytest.raises(L2OError, match="use recipe plain or authors"):
        recipe("default", estimator="pes").validate()
