import json
import math

import pytest
import torch

from l2o_dynamics import meta, optimizees, runner
from l2o_dynamics.learned import L2O, init_phi, l2o_from_checkpoint, preprocess
from l2o_dynamics.meta import MetaTrainConfig, meta_train, read_checkpoint, recipe, unroll, validation_score
from l2o_dynamics.optimizees import ZOO, Optimizee
from l2o_dynamics.errors import L2OError


# ---- a slow, obviously-correct reference ----------------------------------------------------
from l2o_dynamics.seeds import generator
def ref_preprocess(g, p=10.0):
    out = []
    for v in g.tolist():
        out.append((math.log(abs(v)) / p, math.copysign(1.0, v)) if abs(v) >= math.exp(-p)
                   else (-1.0, math.exp(p) * v))
    return torch.tensor(out, dtype=g.dtype)


def reference_unroll(phi, model, params, batches, steps, layers=2, hidden=20, eta=0.1, beta=0.0):
    """Eager, one network call per tensor, plain autograd through the optimizee graph.
    The optimizee gradient is computed by autograd on the unrolled parameters and
    then detached (first order)."""
    theta = {k: v.detach().clone() for k, v in params.items()}
    states = {k: [(torch.zeros(v.numel(), hidden, dtype=v.dtype),) * 2 for _ in range(layers)]
              for k, v in theta.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    loss = model.loss(leaves, *batches[0])
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    losses, penalty = [], 0.0
    for t in range(steps):
        updates = {}
        for k in theta:
            x = ref_preprocess(grads[k].detach().reshape(-1))
            for layer in range(layers):
                h, c = torch.lstm_cell(x, states[k][layer], phi[f"lstm{layer}.weight_ih"],
                                       phi[f"lstm{layer}.weight_hh"], phi[f"lstm{layer}.bias_ih"],
                                       phi[f"lstm{layer}.bias_hh"])
                states[k][layer] = (h, c)
                x = h
            updates[k] = eta * (x @ phi["out.weight"].t() + phi["out.bias"]).reshape(theta[k].shape)
        if beta:
            # rescale deviation written out for the single hidden layer of leaky_relu
            th = {k: v.detach() for k, v in theta.items()}
            c = ((updates["fc1.weight"] * th["fc1.weight"]).sum(1) + updates["fc1.bias"] * th["fc1.bias"]
                 - (updates["fc2.weight"] * th["fc2.weight"]).sum(0))
            penalty = penalty + c.sum().abs()
        theta = {k: theta[k] + updates[k] for k in theta}
        loss = model.loss(theta, *batches[t + 1])
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()), retain_graph=True)))
        losses.append(loss)
    return torch.log(torch.stack(losses).sum()) + beta * penalty


def _batches(n, size, dim=784, classes=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, dim, generator=g, dtype=dtype), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def _fast_unroll(phi, model, params, batches, steps, batch_ndim=0, **kw):
    l2o = L2O(phi)
    it = iter(batches[1:])
    _, grads, _ = model.loss_and_grad(params, *batches[0])
    return unroll(l2o, model, params, l2o.init(params, batch_ndim), grads, lambda: next(it), steps, **kw)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_meta_gradient_equals_slow_reference(beta):
    model = ZOO["leaky_relu"]
    phi = {k: v.requires_grad_() for k, v in init_phi(generator("phi"), dtype=torch.float64).items()}
    params = model.init(generator("theta"), dtype=torch.float64)
    batches = _batches(9, 32)
    kw = {"reg": "rescale", "beta": beta} if beta else {}
    fast = _fast_unroll(phi, model, params, batches, 8, **kw).meta_loss.sum()
    g_fast = torch.autograd.grad(fast, list(phi.values()))
    ref = reference_unroll(phi, model, params, batches, 8, beta=beta)
    g_ref = torch.autograd.grad(ref, list(phi.values()))
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=0)
    for k, a, b in zip(phi, g_fast, g_ref):
        assert b.abs().max() > 0, k
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=k)


def test_meta_gradient_matches_finite_differences():
    """First order means the optimizee gradients fed to the LSTM are inputs, not functions
    of phi. So the exact derivative of the frozen-input meta-loss F(phi) (the run replayed
    with the recorded gradients as LSTM inputs) is what the fast path must return."""
    tiny = Optimizee("tiny", (3,), "leaky_relu", in_features=6, classes=3)
    phi0 = init_phi(generator("tiny-phi"), hidden=4, layers=2, dtype=torch.float64)
    params = tiny.init(generator("tiny-theta"), dtype=torch.float64)
    batches = _batches(7, 16, dim=6, classes=3)
    steps = 6
    phi = {k: v.clone().requires_grad_() for k, v in phi0.items()}
    l2o = L2O(phi, hidden=4)
    it = iter(batches[1:])
    _, grads0, _ = tiny.loss_and_grad(params, *batches[0])
    # record the gradients the LSTM sees
    recorded = [grads0]
    out = unroll(l2o, tiny, params, l2o.init(params), grads0, lambda: next(it), steps)
    fast = torch.autograd.grad(out.meta_loss.sum(), list(phi.values()))
    theta = params
    st = L2O(phi0, hidden=4).init(params)
    with torch.no_grad():
        for t in range(steps - 1):
            upd, st = L2O(phi0, hidden=4).update(recorded[-1], st, theta)
            theta = {k: theta[k] + upd[k] for k in theta}
            recorded.append(tiny.loss_and_grad(theta, *batches[t + 1])[1])

    def frozen(ph):
        net = L2O(ph, hidden=4)
        th, s, losses = params, net.init(params), []
        for t in range(steps):
            upd, s = net.update(recorded[t], s, th)
            th = {k: th[k] + upd[k] for k in th}
            losses.append(tiny.loss(th, *batches[t + 1]))
        return torch.log(torch.stack(losses).sum())

    eps = 1e-6
    for (k, v), g in zip(phi0.items(), fast):
        fd = torch.zeros_like(v)
        for i in range(v.numel()):
            plus = {kk: vv.clone() for kk, vv in phi0.items()}
            minus = {kk: vv.clone() for kk, vv in phi0.items()}
            plus[k].view(-1)[i] += eps
            minus[k].view(-1)[i] -= eps
            fd.view(-1)[i] = (frozen(plus) - frozen(minus)) / (2 * eps)
        torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8, msg=k)


def test_batched_tasks_equal_one_by_one():
    model = ZOO["leaky_relu"]
    phi = {k: v.requires_grad_() for k, v in init_phi(generator("phi")).items()}
    sets = [model.init(generator("task", i)) for i in range(3)]
    per_task = [_batches(6, 32, dtype=torch.float32, seed=10 + i) for i in range(3)]
    stacked = {k: torch.stack([s[k] for s in sets]) for k in sets[0]}
    batches = [(torch.stack([per_task[i][t][0] for i in range(3)]),
                torch.stack([per_task[i][t][1] for i in range(3)])) for t in range(6)]
    batched = _fast_unroll(phi, model, stacked, batches, 5, batch_ndim=1)
    g_batched = torch.autograd.grad(batched.meta_loss.mean(), list(phi.values()))
    singles = [_fast_unroll(phi, model, sets[i], per_task[i], 5) for i in range(3)]
    for i, s in enumerate(singles):
        torch.testing.assert_close(batched.meta_loss[i], s.meta_loss, rtol=1e-5, atol=1e-6)
    g_single = [torch.autograd.grad(s.meta_loss / 3, list(phi.values())) for s in singles]
    for j, k in enumerate(phi):
        torch.testing.assert_close(g_batched[j], sum(g[j] for g in g_single), rtol=1e-4, atol=1e-6, msg=k)


def _tiny_cfg(**kw):
    base = dict(optimizee="leaky_relu", epochs=3, runs=2, horizon=20, unroll=5, val_runs=2,
                meta_lr=1e-2, seed=7)
    base.update(kw)
    return MetaTrainConfig(**base)


def test_short_meta_training_lowers_the_validation_score(synthetic):
    cfg = _tiny_cfg()
    init = L2O(init_phi(generator("phi", cfg.seed)))
    before = validation_score(init, cfg, synthetic)
    res = meta_train(cfg, data=synthetic, progress=False)
    assert res.best_score < 0.9 * before, (before, res.best_score)
    rows = res.log.rows()
    assert {r[6] for r in rows} >= {"meta_loss", "val_score"}
    assert sum(r[6] == "meta_loss" for r in rows) == cfg.epochs * cfg.runs * cfg.horizon // cfg.unroll


def test_resumed_run_is_bit_identical(tmp_path, synthetic):
    cfg = _tiny_cfg(epochs=3, runs=1, reg="rescale", beta=0.1)
    full = meta_train(cfg, tmp_path / "full", data=synthetic, progress=False)
    meta_train(cfg, tmp_path / "cut", data=synthetic, progress=False, stop_after_epochs=1)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    assert not (tmp_path / "cut" / "l2o.pt").exists()  # an interrupted run does not look complete
    resumed = meta_train(cfg, tmp_path / "cut", data=synthetic, progress=False, resume=True)
    for k in full.l2o.phi:
        assert torch.equal(full.l2o.phi[k], resumed.l2o.phi[k]), k
    a = (tmp_path / "full" / "metrics.csv").read_bytes()
    b = (tmp_path / "cut" / "metrics.csv").read_bytes()
    assert a == b and b"reg_loss" in a
    with pytest.raises(L2OError, match="--resume"):
        meta_train(cfg, tmp_path / "full", data=synthetic, progress=False)


def test_a_resumed_runs_wall_time_includes_the_time_before_the_kill(tmp_path, synthetic):
    cfg = _tiny_cfg(epochs=2, runs=1)
    meta_train(cfg, tmp_path / "cut", data=synthetic, progress=False, stop_after_epochs=1)
    ck = tmp_path / "cut" / "checkpoint.pt"
    saved = torch.load(ck, weights_only=False)
    saved["wall_s"] = 1000.0  # as if the part before the kill had taken 1000 s
    torch.save(saved, ck)
    resumed = meta_train(cfg, tmp_path / "cut", data=synthetic, progress=False, resume=True)
    recorded = json.loads((tmp_path / "cut" / "config.json").read_text())["wall_time_s"]
    assert 1000.0 < resumed.wall_time_s < 1000.0 + 600 and 1000.0 < recorded < 1000.0 + 600


class _Poisoned(Optimizee):
    """leaky_relu whose 4th gradient evaluation returns a NaN loss."""

    calls = 0

    def loss_and_grad(self, params, x, y):
        loss, grads, acc = super().loss_and_grad(params, x, y)
        if torch.is_grad_enabled():  # meta-training; validation runs under no_grad
            type(self).calls += 1
            if type(self).calls == 4:
                loss = loss * float("nan")
        return loss, grads, acc


def test_non_finite_meta_loss_is_skipped_and_never_checkpointed(tmp_path, synthetic, monkeypatch):
    _Poisoned.calls = 0
    monkeypatch.setitem(optimizees.ZOO, "poisoned", _Poisoned("poisoned", (20,), "leaky_relu"))
    cfg = _tiny_cfg(optimizee="poisoned", epochs=1, runs=2)
    res = meta_train(cfg, tmp_path, data=synthetic, progress=False)
    assert res.skipped == 1
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["phi"].values())
    rows = res.log.rows()
    assert [r[7] for r in rows if r[6] == "skipped"] == [1.0]
    # the poisoned run was abandoned at its first meta-step; the second run is complete
    assert sum(r[6] == "meta_loss" for r in rows) == 4


def test_config_validation_messages():
    with pytest.raises(L2OError, match="multiple of unroll"):
        MetaTrainConfig(horizon=30, unroll=20).validate()
    with pytest.raises(L2OError, match="no scale symmetry"):
        MetaTrainConfig(optimizee="leaky_relu", reg="scale", beta=1).validate()
    with pytest.raises(L2OError, match="valid: logsum, sum, meanlog"):
        MetaTrainConfig(meta_loss="max").validate()
    with pytest.raises(L2OError, match="beta=0.5 needs reg"):
        MetaTrainConfig(beta=0.5).validate()


@pytest.mark.parametrize("field,value", [("meta_lr", math.inf), ("meta_lr", 3e38), ("eta", math.inf),
                                         ("eta", math.nan), ("p", math.nan), ("beta", -1.0), ("epochs", 0),
                                         ("hidden", 2.5), ("optimizee", ","), ("optimizee", "relu,")])
def test_config_refuses_non_finite_and_out_of_range_values(field, value):
    with pytest.raises(L2OError, match="must be|comma-separated"):
        MetaTrainConfig(**{field: value}).validate()


def test_no_l2o_is_exported_when_no_epoch_validated(tmp_path, synthetic, monkeypatch):
    # every validation run diverged (scored inf): the phi was never validated, so nothing is exported
    monkeypatch.setattr(meta, "validation_scores", lambda *a: {"val_score": math.inf, "val_early": math.inf})
    with pytest.raises(L2OError, match="no epoch of 1 validated.*refusing to export"):
        meta_train(_tiny_cfg(epochs=1, runs=1), tmp_path, data=synthetic, progress=False)
    assert not (tmp_path / "l2o.pt").exists() and not (tmp_path / "config.json").exists()


def test_meta_training_records_the_data_digest(tmp_path, synthetic):
    meta_train(_tiny_cfg(epochs=1, runs=1, val_runs=1), tmp_path, data=synthetic, progress=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["data_digest"] == synthetic.digest and len(synthetic.digest) == 64


def test_rollback_restores_the_best_phi_and_halves_the_meta_lr(synthetic, monkeypatch):
    scores = iter([1.0, 5.0, 0.9])
    seen = []

    def fake_scores(l2o, cfg, data):
        seen.append({k: v.clone() for k, v in l2o.phi.items()})
        score = next(scores)
        return {"val_score": score, "val_early": score}

    monkeypatch.setitem(meta_train.__globals__, "validation_scores", fake_scores)
    lrs = []
    real_meta_lr = meta_train.__globals__["meta_lr"]
    monkeypatch.setitem(meta_train.__globals__, "meta_lr",
                        lambda cfg, step, total, scale=1.0: lrs.append(scale) or real_meta_lr(cfg, step, total, scale))
    starts = []
    real_run = meta_train.__globals__["_one_run"]

    def spy_run(cfg, l2o, *a, **k):
        starts.append({n: v.detach().clone() for n, v in l2o.phi.items()})
        return real_run(cfg, l2o, *a, **k)

    monkeypatch.setitem(meta_train.__globals__, "_one_run", spy_run)
    cfg = _tiny_cfg(epochs=3, runs=1, rollback=2.0)
    res = meta_train(cfg, data=synthetic, progress=False)
    rows = res.log.rows()
    assert [r[7] for r in rows if r[6] == "rollback"] == [1.0]
    assert res.best_epoch == 2 and res.best_score == 0.9
    per_run = cfg.horizon // cfg.unroll
    assert lrs[:2 * per_run] == [1.0] * 2 * per_run and lrs[2 * per_run:] == [0.5] * per_run
    # epoch 3 started from the phi validated after epoch 1 (the best), not from epoch 2's
    assert all(torch.equal(starts[2][k], seen[0][k]) for k in seen[0])
    assert not all(torch.equal(seen[1][k], seen[0][k]) for k in seen[0])


# ---- recipes and the health monitor -------------------------------------------------------
# The published recipe's meta-training of leaky_relu on the `synthetic` data set (float64,
# seed 3, 2 epochs x 1 run of 10 steps, unroll 5), recorded with the code before recipes
# existed (commit 27ffd19): sum of each meta-parameter tensor, and the 4 meta-losses.
PUBLISHED_PHI_SUMS = {
    "lstm0.weight_ih": 0.1670578053310866, "lstm0.weight_hh": 1.4305180892789409,
    "lstm0.bias_ih": -1.5519550049944473, "lstm0.bias_hh": 2.247815209738378,
    "lstm1.weight_ih": 5.20386846709947, "lstm1.weight_hh": -4.965254070582727,
    "lstm1.bias_ih": -1.9581013125371185, "lstm1.bias_hh": -0.9459880789751804,
    "out.weight": -1.0192564476161743, "out.bias": -0.08551560678234575,
}
PUBLISHED_META_LOSSES = [2.444444040954462, 2.4506211759930285, 2.443193431564752, 2.4569132941131926]


def test_plain_recipe_reproduces_the_recorded_meta_training(synthetic):
    cfg = recipe("plain", optimizee="leaky_relu", epochs=2, runs=1, horizon=10, unroll=5,
                 val_runs=1, dtype="float64", seed=3)
    res = meta_train(cfg, data=synthetic, progress=False)
    losses = [float(v) for m, _, v in res.log.entries if m == "meta_loss"]
    # float64 and 4 Adam steps: reduction-order differences (threads, BLAS) stay ~1e-14
    # relative; any change of the recipe's math moves these sums by far more than 1e-9.
    assert losses == pytest.approx(PUBLISHED_META_LOSSES, rel=1e-9)
    for k, v in PUBLISHED_PHI_SUMS.items():
        assert float(res.l2o.phi[k].sum()) == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_plain_recipe_is_the_papers_formulas():
    cfg = recipe("plain")
    assert (cfg.epochs, cfg.runs, cfg.horizon, cfg.unroll, cfg.batch_size) == (50, 20, 200, 20, 128)
    assert (cfg.meta_lr, cfg.meta_loss, cfg.clip_grad, cfg.rollback) == (1e-3, "logsum", None, None)
    assert (cfg.hidden, cfg.layers, cfg.p, cfg.eta, cfg.out_bias) == (20, 2, 10.0, 0.1, "default")
    assert cfg == MetaTrainConfig()
    with pytest.raises(L2OError, match="valid: authors, plain, default"):
        recipe("fast")


def test_authors_recipe_has_the_authors_settings():
    """Each value against the authors' code (learning-to-optimize @10fabbf; docs/replication.md)."""
    cfg = recipe("authors")
    assert recipe("published") == cfg  # the old name is an alias
    # main.ipynb: 50 epochs x 20 runs x 200 iterations, unroll 20 = 10,000 meta-steps, Adam 1e-3
    assert (cfg.epochs, cfg.runs, cfg.horizon, cfg.unroll, cfg.batch_size) == (50, 20, 200, 20, 128)
    assert cfg.total_meta_steps() == 10_000
    assert (cfg.meta_lr, cfg.lr_schedule, cfg.meta_loss) == (1e-3, "constant", "logsum")
    # training.py: the loss of each iteration is taken before its update; no clipping, no rollback
    assert cfg.loss_index == "current"
    assert (cfg.clip_grad, cfg.rollback, cfg.collapse, cfg.short_runs, cfg.curriculum) == (None, None, None, 0.0, None)
    assert cfg.log_eps == 1e-8  # optimizer.py:50, log(|g| + 1e-8)
    # training.py:316-349 with main.ipynb's n_tests=3: each epoch, 3 fresh runs on the training
    # split; the epoch with the lowest mean summed training loss is kept
    assert cfg.select == "train-runs" and cfg.val_runs == 3
    assert (cfg.hidden, cfg.layers, cfg.p, cfg.eta) == (20, 2, 10.0, 0.1)


def test_authors_preprocessing_adds_eps_inside_the_log():
    g = torch.tensor([1e-3, -2.0, 1e-6, 0.0], dtype=torch.float64)
    x = preprocess(g, 10.0, 1e-8)
    assert x[0, 0].item() == math.log(1e-3 + 1e-8) / 10 and x[1, 0].item() == math.log(2.0 + 1e-8) / 10
    assert preprocess(g, 10.0)[0, 0].item() == math.log(1e-3) / 10
    assert x[2].tolist() == [-1.0, 1e-6 * math.exp(10.0)] and x[3].tolist() == [-1.0, 0.0]  # below e^-p: untouched


def test_meta_loss_selection_keeps_the_epoch_with_the_lowest_mean_training_loss(synthetic, tmp_path):
    cfg = recipe("authors", select="meta-loss", optimizee="leaky_relu", epochs=3, runs=1, horizon=10, unroll=5,
                 val_runs=1, dtype="float64", seed=1)
    res = meta_train(cfg, tmp_path, data=synthetic, progress=False)
    assert l2o_from_checkpoint(tmp_path / "l2o.pt").log_eps == 1e-8  # the exported L2O preprocesses as trained
    # 2 meta-steps of 5 losses per epoch; an epoch's score is the mean of its 10 losses before each update
    per_step = [v for m, _, v in res.log.entries if m == "unroll_loss"]
    means = [(per_step[2 * e] + per_step[2 * e + 1]) / 2 for e in range(3)]
    assert res.best_epoch == min(range(3), key=means.__getitem__)
    assert res.best_score == pytest.approx(min(means), rel=1e-12)
    assert [v for m, _, v in res.log.entries if m == "train_score"] == pytest.approx(means, rel=1e-12)
    with pytest.raises(L2OError, match="rollback"):
        recipe("authors", select="meta-loss", rollback=1.5).validate()


def test_unroll_loss_is_the_mean_of_the_losses_before_each_update(synthetic):
    """One run of 2 unrolls of 3 steps: the first unroll's losses before each update are
    L(theta_0..theta_2), the same values a plain meta-test of the starting L2O records."""
    cfg = recipe("authors", select="meta-loss", optimizee="leaky_relu", epochs=1, runs=1, horizon=6, unroll=3,
                 val_runs=1, dtype="float64", meta_lr=1e-12, seed=2)
    res = meta_train(cfg, data=synthetic, progress=False)
    start = L2O(init_phi(generator("phi", 2), dtype=torch.float64))
    seed = meta.derive_seed("train", 2, 0, 0, 0)
    curve = runner.meta_test(start, ZOO["leaky_relu"], synthetic.split("train"), [seed], 6, batch_size=128,
                             dtype=torch.float64).curve("train_loss")[:, 0]  # (7,) steps 0..6
    got = [v for m, _, v in res.log.entries if m == "unroll_loss"]
    # meta-lr 1e-12 moves phi by ~1e-12: the second unroll's losses agree to ~1e-10
    assert got == pytest.approx([curve[0:3].mean(), curve[3:6].mean()], rel=1e-8)


def test_train_runs_selection_scores_fresh_runs_on_the_training_split(synthetic):
    l2o = L2O(init_phi(generator("phi", 0), dtype=torch.float64))
    on = {s: recipe("authors", select=s, optimizee="leaky_relu", horizon=10, unroll=5, val_runs=2,
                    dtype="float64") for s in ("train-runs", "val")}
    got = validation_score(l2o, on["train-runs"], synthetic)
    seeds = [meta.VAL_SEEDS + i for i in range(2)]
    ref = runner.meta_test(l2o, ZOO["leaky_relu"], synthetic.split("train"), seeds, 10, batch_size=128,
                         dtype=torch.float64).total("train_loss").mean() / 10
    assert got == pytest.approx(float(ref), rel=1e-12)
    assert got != validation_score(l2o, on["val"], synthetic)


def _collapsed_phi():
    """An L2O that ignores its input: every coordinate moves by eta * (-0.5) each step."""
    phi = {k: torch.zeros_like(v) for k, v in init_phi(generator("phi", 0)).items()}
    phi["out.bias"] = torch.tensor([-0.5])
    return phi


def test_monitor_measures_the_drift_of_a_gradient_independent_update():
    model = ZOO["leaky_relu"]
    params = {k: v.unsqueeze(0) for k, v in model.init(generator("init", 0)).items()}
    batches = iter(_batches(6, 32, dtype=torch.float32))
    next_batch = lambda: next(batches)  # noqa: E731
    x, y = next_batch()
    _, grads, _ = model.loss_and_grad(params, x, y)
    collapsed = L2O(_collapsed_phi())
    out = unroll(collapsed, model, params, collapsed.init(params, 1), grads, next_batch, 3)
    assert out.drift.shape == (3, 1) and torch.all(out.drift == 1.0)  # mean u = -|u| exactly
    # any L2O: drift is |mean u| / mean |u| over the coordinates of each run's update
    l2o = L2O(init_phi(generator("phi", 1)))
    two = {k: torch.cat([v, v.flip(-1)]) for k, v in params.items()}  # 2 runs, other params
    _, g2, _ = model.loss_and_grad(two, x, y)
    u, _ = l2o.update(g2, l2o.init(two, 1), two)
    flat = torch.cat([v.flatten(1) for v in u.values()], 1)  # (2, P)
    expected = flat.mean(1).abs() / flat.abs().mean(1)
    batches = iter(_batches(6, 32, dtype=torch.float32, seed=1))
    out = unroll(l2o, model, two, l2o.init(two, 1), g2, next_batch, 1)
    torch.testing.assert_close(out.drift[0], expected, rtol=1e-5, atol=0)


def test_monitor_flags_a_collapsed_phi_and_rolls_back_once_a_phi_validated(synthetic):
    cfg = _tiny_cfg(epochs=2, runs=2, collapse=0.9, rollback_cut=1.0)
    res = meta_train(cfg, data=synthetic, progress=False, phi0=_collapsed_phi())
    rows = res.log.rows()
    metrics = {r[6] for r in rows}
    assert {"meta_grad_norm", "drift", "dead_frac"} <= metrics
    first_val = min(r[5] for r in rows if r[6] == "val_score")
    flags = [r for r in rows if r[6] == "collapse"]
    assert all(r[7] > 0.9 for r in flags)
    # before any phi validated, a flag is logged but training goes on (nothing to go back to:
    # restarting from the same init would collapse the same way, forever)
    assert any(r[5] <= first_val for r in flags)
    rollbacks = [r for r in rows if r[6] == "rollback"]
    assert rollbacks and all(r[5] > first_val for r in rollbacks)
    # after it, a flag rolls back and abandons its run: fewer meta-steps than scheduled
    assert len(rollbacks) == sum(r[5] > first_val for r in flags)
    assert sum(r[6] == "meta_loss" for r in rows) < cfg.total_meta_steps()
    # the same start with the published recipe (no monitor threshold) raises no flag
    plain = meta_train(_tiny_cfg(epochs=1, runs=1), data=synthetic, progress=False, phi0=_collapsed_phi())
    assert not any(r[6] == "collapse" for r in plain.log.rows())


def test_dead_fraction_counts_units_flat_on_every_example():
    model = ZOO["relu"]
    params = model.init(generator("init", 0))
    x = torch.rand(16, 784)
    params["fc1.bias"] = params["fc1.bias"].clone()
    params["fc1.bias"][:5] = -1e3  # 5 of 20 units can never fire
    params["fc1.bias"][5:] = 1e3  # the other 15 always do
    assert float(model.dead_fraction(params, x)) == 0.25
    sig = ZOO["sigmoid"]
    p = sig.init(generator("init", 0))
    p["fc1.bias"] = torch.where(torch.arange(20) < 4, 50.0, 0.0)  # 4 saturated units (slope ~ 0)
    assert float(sig.dead_fraction(p, x)) == pytest.approx(0.2)


def test_curriculum_and_short_runs_schedule_the_meta_steps():
    cfg = MetaTrainConfig(epochs=4, runs=10, horizon=200, unroll=20, curriculum=(200, 20)).validate()
    # stage 1: 10 runs of 200 steps; stage 2: 100 runs of the first unroll: 100 meta-steps per epoch
    assert [(cfg.run_horizon(e, 0), cfg.epoch_runs(e)) for e in range(4)] == [(200, 10)] * 2 + [(20, 100)] * 2
    assert cfg.total_meta_steps() == 400
    short = MetaTrainConfig(epochs=1, runs=4, short_runs=0.5).validate()
    assert [short.run_horizon(0, r) for r in range(4)] == [200, 20, 200, 20]
    with pytest.raises(L2OError, match="multiples of unroll"):
        MetaTrainConfig(curriculum=(30,)).validate()


def test_a_checkpoint_written_before_the_family_fields_existed_resumes(tmp_path, synthetic):
    """Configs of older checkpoints lack family, mlp_hidden, mlp_layers, step_mult, exp_mult: they
    are read at their defaults (the LSTM family), so the run resumes; an MLP config does not match."""
    cfg = _tiny_cfg(epochs=2, runs=1, horizon=10, val_runs=1)
    meta_train(cfg, tmp_path, data=synthetic, progress=False, stop_after_epochs=1)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    new = ("family", "mlp_hidden", "mlp_layers", "step_mult", "exp_mult")
    assert all(k in ck["config"] for k in new)
    ck["config"] = {k: v for k, v in ck["config"].items() if k not in new}
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(L2OError, match="different config"):
        read_checkpoint(tmp_path / "checkpoint.pt", _tiny_cfg(epochs=2, runs=1, horizon=10, val_runs=1,
                                                              family="mlp"))
    res = meta_train(cfg, tmp_path, data=synthetic, progress=False, resume=True)
    assert res.best_epoch >= 0 and (tmp_path / "l2o.pt").exists()
