"""Verdict functions on synthetic tables whose right answer is known by construction."""
import math

import numpy as np
import pytest

from l2o_dynamics import analysis, results
from l2o_dynamics.analysis import Paired, beta_slopes, majority, paired, per_seed, rise_time, verdict
from l2o_dynamics.results import Table


def _table(curves: dict[tuple[str, float | None], np.ndarray], metric="train_loss", experiment="regularization",
           optimizee="leaky_relu") -> Table:
    """curves[(optimizer, beta)] = (T, S) values -> a long table."""
    data = {c: [] for c in ("experiment", "optimizee", "optimizer", "beta", "seed", "step", "metric", "value")}
    for (opt, beta), v in curves.items():
        for t in range(v.shape[0]):
            for s in range(v.shape[1]):
                for c, x in zip(data, (experiment, optimizee, opt, "" if beta is None else beta, s, t, metric,
                                       v[t, s])):
                    data[c].append(x)
    return Table.from_lists(data)


# the 95% t-interval of (1, 2, 3): mean 2, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 * 0.577 = 2.48
@pytest.mark.parametrize("diffs,expected", [
    ([1.0, 1.1, 0.9], "held"),  # mean 1, half-width 4.303 * 0.1 / 1.73 = 0.25: excludes 0
    ([1.0, 2.0, 3.0], "weak"),  # [-0.48, 4.48]: includes 0, claimed sign
    ([-1.0, -2.0, -3.0], "inconclusive-opposite"),  # [-4.48, 0.48]
    ([-1.0, -1.1, -0.9], "contradicted"),  # [-1.25, -0.75]
    ([0.0, 0.0, 0.0], "inconclusive-opposite"),  # no effect is not the claimed direction
    ([5.0], "n/a"),  # one seed: no verdict, not "held" with a zero-width interval
    ([5.0, 6.0], "n/a"),
    ([1.0, 1.1, math.nan], "n/a"),  # a diverged seed leaves 2 usable
    ([1.0, 1.1, 0.9, math.nan], "held"),
])
def test_verdict_has_four_levels_and_needs_three_seeds(diffs, expected):
    assert verdict(diffs) == expected


def test_a_diverged_run_is_nan_for_its_seed_and_counted_when_paired():
    curves = np.ones((10, 3))
    curves[7, 1] = math.inf  # seed 1 diverged at step 7
    t = _table({("l2o", None): curves})
    ps = per_seed(t.where(optimizer="l2o"))
    assert ps[0] == 1.0 and ps[2] == 1.0 and math.isnan(ps[1])  # not the mean over the finite steps
    d = paired(ps, {0: 0.5, 1: 0.5, 2: 0.5})
    assert list(d) == [0.5, 0.5] and d.diverged == 1
    assert analysis.diverged_note(d) == {"seeds left out (a run diverged)": "1"}


def test_beta_slopes_is_the_per_seed_least_squares_trend():
    # seed s: loss = 1 + (s + 1) * 0.1 * beta  -> slopes 0.1, 0.2, 0.3 exactly
    by_beta = {b: {s: 1 + (s + 1) * 0.1 * b for s in range(3)} for b in (0.0, 0.1, 0.5, 1.0)}
    assert beta_slopes(by_beta) == pytest.approx([0.1, 0.2, 0.3], rel=1e-12)
    # a non-monotone middle beta moves the slope; largest-minus-smallest would not see it
    by_beta[0.5] = {s: 10.0 for s in range(3)}
    assert beta_slopes(by_beta) != pytest.approx([0.1, 0.2, 0.3])
    by_beta[0.1][2] = math.nan
    assert len(beta_slopes(by_beta)) == 2 and beta_slopes(by_beta).diverged == 1


def test_regularization_trend_finding_on_a_known_slowdown():
    T, S = 20, 4
    rng = np.random.default_rng(0)
    curves = {("l2o", b): 1.0 + b * 0.5 + 0.01 * rng.standard_normal((T, S)) for b in (0.0, 0.1, 0.5, 1.0)}
    f = analysis.regularization_findings(_table(curves))[0]
    assert f.verdict == "held"
    faster = {("l2o", b): 1.0 - b * 0.5 + 0.01 * rng.standard_normal((T, S)) for b in (0.0, 0.1, 0.5, 1.0)}
    assert analysis.regularization_findings(_table(faster))[0].verdict == "contradicted"
    one_seed = {k: v[:, :1] for k, v in curves.items()}
    assert analysis.regularization_findings(_table(one_seed))[0].verdict == "n/a"
    diverged = {k: v.copy() for k, v in curves.items()}
    diverged[("l2o", 1.0)][15, 2] = math.nan  # seed 2 diverged at beta = 1
    f = analysis.regularization_findings(_table(diverged))[0]
    assert f.verdict == "held" and f.values["seeds left out (a run diverged)"] == "1"


def test_rise_time_is_robust_to_one_spike():
    steps = np.arange(100)
    v = np.ones(100)
    v[3] = 1000.0  # one spike early: "first step at half the maximum" would say 3
    assert rise_time(steps, v) == 3  # the spike is half the total mass here ...
    v[3] = 10.0  # ... but a moderate spike no longer decides it
    assert 40 <= rise_time(steps, v) <= 50
    ramp = np.linspace(0, 1, 101)[1:]  # cumulative mass of a ramp reaches half at 1/sqrt(2)
    assert rise_time(np.arange(100), ramp) == pytest.approx(70, abs=1)
    assert math.isnan(rise_time(steps, np.zeros(100)))


def test_combine_and_majority():
    assert analysis._combine(["held", "held"]) == "held"
    assert analysis._combine(["held", "weak"]) == "weak"
    assert analysis._combine(["held", "contradicted", "weak"]) == "contradicted"
    assert analysis._combine(["held", "n/a"]) == "n/a"
    assert majority(["held", "held", "weak"]) == "held"
    assert majority(["held", "weak", "contradicted"]) == "weak"
    assert majority(["contradicted", "contradicted", "weak"]) == "contradicted"
    assert majority(["inconclusive-opposite", "weak", "inconclusive-opposite"]) == "inconclusive-opposite"
    assert isinstance(paired({}, {}), Paired)


def test_majority_needs_three_decided_comparisons():
    # two held comparisons are "more than half" of two, but a majority of two says nothing
    assert majority(["held", "held"]) == "n/a"
    assert majority(["held", "held", "n/a"]) == "n/a"  # n/a comparisons do not count
    assert majority(["held", "held", "n/a", "weak"]) == "held"
    assert majority([]) == "n/a"


# ---- several meta-training seeds ------------------------------------------------------------------
def _fast_start_table(l2o_offsets: list[float], S: int = 5) -> Table:
    """Adam at loss 1 everywhere; the L2O of meta seed k at 1 - offset_k, the same on every
    test seed up to +-0.001: each L2O alone is decided within its seeds."""
    rng = np.random.default_rng(1)
    curves = {("adam", None): np.ones((40, S))}
    for k, off in enumerate(l2o_offsets):
        curves[(results.l2o_label("l2o", k), 0.0)] = 1 - off + 0.001 * rng.standard_normal((40, S))
    return _table(curves)


def test_labels_of_meta_seeds_round_trip():
    assert results.l2o_label("l2o", 0) == "l2o" and results.l2o_label("l2o(leaky_relu)", 2) == "l2o(leaky_relu)@m2"
    assert results.split_label("l2o(leaky_relu)@m2") == ("l2o(leaky_relu)", 2)
    assert results.split_label("adam") == ("adam", 0) and results.split_label("l2o") == ("l2o", 0)


def test_intervals_are_over_meta_trained_l2os_not_test_seeds():
    # three L2Os, each clearly ahead of or behind Adam on all its 5 test seeds: +0.3, -0.2, +0.1.
    one = analysis.l2o_vs_adam(_fast_start_table([0.3]))
    assert one.verdict == "held"  # one L2O: the test-seed interval is tight
    (f,) = [f for f in analysis.all_findings(_fast_start_table([0.3, -0.2, 0.1])) if f.key == "l2o_fast_start"]
    # per-L2O means 0.3, -0.2, 0.1 (mean 0.0667, sd 0.257, half-width 4.303 * 0.257 / 1.732 = 0.64)
    early = f.stats["leaky_relu: first 5 iterations, Adam minus L2O"]
    assert early.means() == pytest.approx([0.3, -0.2, 0.1], abs=0.002)
    assert [len(row) for row in early] == [5, 5, 5]  # each L2O's 5 test seeds kept for the bootstrap
    assert f.verdict == "weak"  # the claimed sign, but the interval over L2Os includes 0
    assert "3 meta-trained L2Os" in f.measure
    # the same three L2Os all ahead: held over L2Os
    (g,) = [f for f in analysis.all_findings(_fast_start_table([0.3, 0.25, 0.35])) if f.key == "l2o_fast_start"]
    assert g.verdict == "held"
    # two L2Os: too few for a verdict, however tight each one is
    (h,) = [f for f in analysis.all_findings(_fast_start_table([0.3, 0.3])) if f.key == "l2o_fast_start"]
    assert h.verdict == "n/a"


def test_baseline_numbers_keep_their_test_seed_interval_and_an_all_diverged_l2o_is_counted():
    S, T = 4, 30
    rng = np.random.default_rng(2)
    base = {o: 1.0 + 0.1 * rng.standard_normal((T, S)) for o in ("sgd", "adam", "lion")}
    curves = {(o, None): v for o, v in base.items()}
    for k in range(3):
        curves[(results.l2o_label("l2o", k), None)] = 10.0 + k + 0.1 * rng.standard_normal((T, S))
    curves[(results.l2o_label("l2o", 2), None)][5, :] = math.nan  # every run of the third L2O diverged
    t = _table(curves, metric="rescale_deviation", experiment="symmetry-breaking")
    (f,) = [f for f in analysis.all_findings(t) if f.key == "deviation_rescale_total"]
    assert f.stats["adam"] == pytest.approx(list(per_seed(t.where(optimizer="adam")).values()))  # 4 test seeds
    assert len(f.stats["l2o"]) == 2  # one row per usable L2O
    assert f.stats["log10(L2O / sgd)"].diverged == 4 + 1  # its 4 seeds, and the L2O itself
    assert f.verdict == "n/a"  # two usable L2Os


def test_views_and_pooled_table_keep_each_l2o_apart():
    t = _fast_start_table([0.3, -0.2, 0.1], S=2)
    views = analysis.l2o_views(t)
    assert analysis.meta_seeds(t) == 3 and len(views) == 3
    for k, v in enumerate(views):
        assert v.unique("optimizer") == ["adam", "l2o"]
        assert len(v.where(optimizer="adam")) == len(t.where(optimizer="adam"))
        assert v.where(optimizer="l2o").cols["value"].mean() == pytest.approx(1 - [0.3, -0.2, 0.1][k], abs=0.01)
    pooled = analysis.pool_l2os(t)
    assert pooled.unique("optimizer") == ["adam", "l2o"] and len(pooled) == len(t)
    assert sorted(set(pooled.where(optimizer="l2o").cols["seed"].tolist())) == [
        k * analysis.SEED_STRIDE + s for k in range(3) for s in range(2)]


# ---- L2O vs baseline statistics decided by label ----------------------------------------------------
def _symmetry_table(l2o_curves: list[np.ndarray], S: int = 5) -> Table:
    """SGD and Adam deviate ~0.01, Lion rises linearly, every L2O deviates ~1 front-loaded
    (a decaying curve): each L2O alone holds every symmetry claim within its test seeds."""
    T = 40
    rng = np.random.default_rng(3)
    steps = np.arange(T)[:, None]
    curves = {("sgd", None): 0.01 + 0.001 * rng.random((T, S)), ("adam", None): 0.01 + 0.001 * rng.random((T, S)),
              ("lion", None): 0.05 * (steps + 1) * (1 + 0.01 * rng.random((T, S)))}
    for k, c in enumerate(l2o_curves):
        curves[(results.l2o_label("l2o", k), None)] = c
    return _table(curves, metric="rescale_deviation", experiment="symmetry-breaking")


def test_l2o_statistics_that_coincide_across_l2os_are_still_over_l2os():
    T, S = 40, 5
    rng = np.random.default_rng(4)
    l2o = np.exp(-np.arange(T) / 5.0)[:, None] * (1 + 0.01 * rng.random((T, S)))  # half its total by step 3
    timing = lambda t: [f for f in analysis.all_findings(t) if f.key == "deviation_rescale_timing"][0]  # noqa: E731
    assert timing(_symmetry_table([l2o])).verdict == "held"  # one L2O: decided over its 5 test seeds
    f = timing(_symmetry_table([l2o, l2o.copy()]))  # two L2Os whose integer rise times coincide
    # equal values across the two L2Os made these a baseline's (5 test seeds -> "held"); by label
    # they are the L2Os' statistics: two L2Os, no verdict
    assert f.verdict == "n/a"
    assert isinstance(f.stats["Lion minus L2O (iterations)"], analysis.OverL2Os)
    assert len(f.stats["Lion minus L2O (iterations)"]) == 2 and len(f.stats["half-total iteration, L2O"]) == 2
    assert f.stats["half-total iteration, Lion"] == pytest.approx(  # Lion's own: its 5 test seeds, as they are
        timing(_symmetry_table([l2o])).stats["half-total iteration, Lion"])
    g = timing(_symmetry_table([l2o, l2o.copy(), l2o.copy()]))  # three identical L2Os: the test seeds decide
    assert g.verdict == "held" and len(g.stats["Lion minus L2O (iterations)"]) == 3


def test_a_baseline_statistic_is_one_that_has_values_with_every_l2o_run_masked():
    T, S = 40, 5
    l2o = np.exp(-np.arange(T) / 5.0)[:, None] * np.ones((T, S))
    t = _symmetry_table([l2o, 2 * l2o, 3 * l2o])
    masked = analysis.findings_of_one(analysis.without_l2os(analysis.l2o_views(t)[0]))
    (m,) = [f for f in masked if f.key == "deviation_rescale_total"]
    assert all(np.isnan(m.stats["l2o"])) and len(m.stats["log10(L2O / sgd)"]) == 0  # read an L2O run
    assert np.all(np.isfinite(m.stats["sgd"])) and np.all(np.isfinite(m.stats["lion"]))  # read none
    (f,) = [f for f in analysis.all_findings(t) if f.key == "deviation_rescale_total"]
    assert not isinstance(f.stats["adam"], analysis.OverL2Os) and len(f.stats["adam"]) == S
    assert f.stats["l2o"].means() == pytest.approx([np.mean(l2o), 2 * np.mean(l2o), 3 * np.mean(l2o)])


# ---- a trend over beta needs several meta-trainings per beta ----------------------------------------
def _slowdown_table(K: int, betas=(0.0, 0.5, 1.0), S: int = 4) -> Table:
    rng = np.random.default_rng(5)
    return _table({(results.l2o_label("l2o", k), b): 1.0 + 0.5 * b + 0.01 * rng.standard_normal((20, S))
                   for k in range(K) for b in betas})


def test_a_trend_over_beta_from_one_l2o_per_beta_says_so():
    (f,) = [f for f in analysis.all_findings(_slowdown_table(1)) if f.key == "regularization_slowdown"]
    assert f.verdict == "held" and "[single L2O per beta]" in f.claim and "single L2O per beta" in f.measure


def test_a_trend_over_beta_with_fewer_than_three_meta_trainings_per_beta_is_na():
    (f,) = [f for f in analysis.all_findings(_slowdown_table(2)) if f.key == "regularization_slowdown"]
    assert f.verdict == "n/a" and "single L2O" not in f.claim
    assert f.values["meta-trainings per beta"].startswith("2 to 2")
    (g,) = [f for f in analysis.all_findings(_slowdown_table(3)) if f.key == "regularization_slowdown"]
    assert g.verdict == "held" and "meta-trainings per beta" not in g.values and "single L2O" not in g.claim
    # three meta-trainings at two betas, one at the third: not a single-L2O result, and too few there
    t = _slowdown_table(3, betas=(0.0, 0.5))
    t = Table({c: np.concatenate([t.cols[c], _slowdown_table(1, betas=(1.0,)).cols[c]]) for c in t.cols})
    assert analysis.meta_trainings_per_beta(t, "regularization") == (1, 3)
    (h,) = [f for f in analysis.all_findings(t) if f.key == "regularization_slowdown"]
    assert h.verdict == "n/a" and "single L2O" not in h.claim


# ---- the two-level bootstrap ----------------------------------------------------------------------
def _one_level_width(values: np.ndarray, reps: int = 4000, seed: int = 11) -> float:
    """Width of mean +- t(n-1) * SE with SE from the plain bootstrap of the mean of `values`
    (n,): the reference for each limit of the two-level interval (written out apart)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = values[rng.integers(0, n, (reps, n))].mean(axis=1)
    from scipy import stats as st
    return 2 * float(st.t.ppf(0.975, n - 1) * means.std(ddof=1))


def _crossed(K: int, S: int, sd_l2o: float, sd_seed: float, sd_cell: float, rng) -> np.ndarray:
    """x[k, s] = a_k + b_s + e_ks, true mean 0: a_k between meta-trainings, b_s a test seed's
    effect shared by every L2O (its init, data order and the baseline's run), e_ks the rest."""
    return (sd_l2o * rng.standard_normal((K, 1)) + sd_seed * rng.standard_normal((1, S))
            + sd_cell * rng.standard_normal((K, S)))


def test_two_level_interval_without_between_l2o_variance_is_the_test_seed_bootstrap():
    rng = np.random.default_rng(6)
    seed_effects = rng.standard_normal(8)  # (S,)
    x = np.tile(seed_effects, (4, 1))  # (K, S): four L2Os that coincide
    m, lo, hi = analysis.interval(x)
    assert m == pytest.approx(seed_effects.mean(), rel=1e-12)
    # SE to ~1.6% per 2000 resamples on either side: 6% is 2.5 sigma of the difference
    assert hi - lo == pytest.approx(_one_level_width(seed_effects), rel=0.06)
    # the t-interval over the L2O means alone has width 0: the shared seed effect left out
    _, lo1, hi1 = analysis.interval(x.mean(axis=1).tolist())
    assert hi1 == lo1


def test_two_level_interval_is_dominated_by_large_between_l2o_variance():
    rng = np.random.default_rng(7)
    x = _crossed(5, 8, sd_l2o=100.0, sd_seed=1.0, sd_cell=1.0, rng=rng)
    m, lo, hi = analysis.interval(x)
    assert m == pytest.approx(x.mean(axis=1).mean(), rel=1e-12)
    assert hi - lo == pytest.approx(_one_level_width(x.mean(axis=1)), rel=0.06)  # the bootstrap over L2Os
    assert hi - lo > 20 * _one_level_width(x.mean(axis=0))  # far wider than the test seeds' alone


@pytest.mark.parametrize("sd_l2o,sd_seed,sd_cell", [(1.0, 0.0, 0.1), (0.0, 1.0, 0.1), (1.0, 0.3, 0.3)])
def test_two_level_interval_covers_the_mean_with_three_l2os(sd_l2o, sd_seed, sd_cell):
    # 300 synthetic (K=3, S=5) tables of true mean 0; coverage over 300 has SE 1.3% at 0.95
    rng = np.random.default_rng(8)
    hits = [lo <= 0 <= hi for lo, hi in (analysis.interval(_crossed(3, 5, sd_l2o, sd_seed, sd_cell, rng))[1:]
                                          for _ in range(300))]
    assert np.mean(hits) >= 0.88


def test_the_t_interval_over_l2o_means_misses_a_shared_test_seed_effect():
    # what the two-level interval fixes: with the test-seed effect shared, L2O means agree
    rng = np.random.default_rng(9)
    hits = [lo <= 0 <= hi for lo, hi in (analysis.interval(_crossed(3, 5, 0.0, 1.0, 0.1, rng).mean(axis=1).tolist())[1:]
                                          for _ in range(300))]
    assert np.mean(hits) < 0.5


def test_two_level_interval_is_deterministic_and_skips_missing_values():
    x = _crossed(4, 6, 1.0, 1.0, 0.5, np.random.default_rng(10))
    assert analysis.interval(x) == analysis.interval(x.copy())  # seeded resamples
    assert analysis.two_level_interval(x, seed=1) != analysis.two_level_interval(x, seed=0)
    holes = np.vstack([x, np.full((1, 6), math.nan)])  # a fifth L2O with no usable seed
    holes[0, 2] = math.nan
    m, lo, hi = analysis.interval(holes)
    assert np.isfinite([m, lo, hi]).all() and lo < m < hi
    assert m == pytest.approx(np.mean([np.nanmean(r) for r in holes[:4]]), rel=1e-12)
    assert analysis.usable(holes) == 4 and verdict(holes[:2]) == "n/a"


# ---- an infinite tail index is not a divergence -------------------------------------------------------
def test_an_infinite_alpha_is_left_out_but_not_counted_as_diverged():
    S, C = 4, 3  # seeds, checkpoints
    curves = {("sgd", None): np.full((C, S), 0.8), ("adam", None): np.full((C, S), 0.9),
              ("l2o", None): np.full((C, S), 1.2)}
    curves[("l2o", None)][1, 2] = math.inf  # seed 2: no tail growth at one checkpoint (tail.py's inf)
    t = _table(curves, metric="alpha_update", experiment="noise")
    grad = _table({k: np.full((C, S), 0.7) for k in curves}, metric="alpha_grad", experiment="noise")
    loss = _table({k: np.ones((C, S)) for k in curves}, metric="train_loss", experiment="noise")
    flags = _table({k: np.zeros((1, S)) for k in curves}, metric="diverged", experiment="noise")
    t = Table({c: np.concatenate([x.cols[c] for x in (t, grad, loss, flags)]) for c in t.cols})
    assert per_seed(t.where(optimizer="l2o", metric="alpha_update"))[2] == math.inf  # a value, not NaN
    assert math.isnan(per_seed(_table({("l2o", None): np.array([[1.0], [math.inf]])}))[0])  # an infinite loss
    (f,) = [f for f in analysis.all_findings(t) if f.key == "alpha_update_vs_baselines"]
    assert "seeds left out (a run diverged)" not in f.values
    assert f.values["seeds left out (alpha = inf: no tail growth; not a divergence)"] == "2"  # vs SGD and vs Adam
    assert list(f.stats["L2O minus sgd"]) == pytest.approx([0.4, 0.4, 0.4]) and f.verdict == "held"
    # the same seed flagged diverged by the runner is a divergence
    t.cols["value"][(t.cols["metric"] == "diverged") & (t.cols["optimizer"] == "l2o") & (t.cols["seed"] == 2)] = 1.0
    (g,) = [f for f in analysis.all_findings(t) if f.key == "alpha_update_vs_baselines"]
    assert g.values["seeds left out (a run diverged)"] == "2" and not any("alpha = inf" in k for k in g.values)


def test_the_report_marks_tables_that_pool_several_l2os_as_descriptive():
    from l2o_dynamics import report
    from l2o_dynamics.experiments import get_profile

    def text(t: Table) -> list[str]:
        blocks = report.build_report(t, analysis.all_findings(t), {}, get_profile("quick"), [], None, {}, 1.0, "test")
        return [b[1] for b in blocks if b[0] == "p"]

    pooled = text(_fast_start_table([0.3, 0.25, 0.35]))
    assert pooled.count(report.POOLED_NOTE.format(k=3)) == 2  # before the speed table and before the figures
    assert "independent" in report.POOLED_NOTE and "two-level bootstrap" in report.interval_note(
        _fast_start_table([0.3, 0.25, 0.35]))
    assert not any(p.startswith("Descriptive only") for p in text(_fast_start_table([0.3])))  # one L2O: nothing pooled


def test_a_run_flagged_diverged_is_left_out_of_every_window_and_counted():
    # seed 1's loss is finite throughout (it blew up only in its parameters at the end),
    # but runner.meta_test flagged it: its early-window mean must not be used
    loss = _table({("l2o", None): np.array([[2.0, 2.0], [1.0, 1.5]])})
    flags = _table({("l2o", None): np.array([[0.0, 1.0]])}, metric="diverged")
    t = Table({c: np.concatenate([loss.cols[c], flags.cols[c]]) for c in loss.cols})
    early = per_seed(analysis.mask_diverged(t).where(metric="train_loss"), steps=(0, 0))
    assert early[0] == 2.0 and math.isnan(early[1])
    assert per_seed(t.where(metric="train_loss"), steps=(0, 0)) == {0: 2.0, 1: 2.0}  # unmasked: it would count
    assert paired(early, {0: 1.0, 1: 1.0}).diverged == 1


def _concat(*tables: Table) -> Table:
    return Table({c: np.concatenate([t.cols[c] for t in tables]) for c in tables[0].cols})


def test_the_covariance_finding_never_averages_step_0_with_later_checkpoints():
    # 5 checkpoints x 3 seeds. Adam's first, sign-like step: 0.1 at step 0, then 1e-4; the L2O 1e-2
    # throughout. Averaged with step 0 Adam's mean would be (0.1 + 4e-4) / 5 = 0.02 > 0.01; after
    # step 0 the L2O is 100x Adam (log10 ratio 2)
    T, S = 5, 3
    adam = np.full((T, S), 1e-4)
    adam[0] = 0.1
    curves = {("sgd", None): np.full((T, S), 1e-4), ("adam", None): adam, ("l2o", None): np.full((T, S), 1e-2)}
    (f,) = [f for f in analysis.noise_findings(_table(curves, "cov_max_eig", "noise")) if f.key == "cov_max_eig"]
    assert f.stats["log10(L2O / adam)"] == pytest.approx([2.0] * S)
    assert f.stats["cov_max_eig adam, step 0"] == pytest.approx([0.1] * S)  # shown apart
    assert f.stats["cov_max_eig adam, after step 0"] == pytest.approx([1e-4] * S)
    assert f.verdict == "held"


def _published_deviations(l2o_ratio: float) -> Table:
    """rescale deviations of 4 seeds over 20 steps: corrected, the L2O equal to Adam; as
    published, the L2O `l2o_ratio` x its corrected deviation and SGD at rounding level."""
    rng = np.random.default_rng(3)
    T, S = 20, 4
    dev = {o: (1.0 + 0.05 * rng.standard_normal((T, S))) for o in ("sgd", "adam", "lion", "l2o")}
    pub = {**dev, "sgd": np.full((T, S), 1e-9), "l2o": l2o_ratio * dev["l2o"]}
    return _concat(*(_table({(o, None): v for o, v in d.items()}, metric, "symmetry-breaking")
                     for d, metric in ((dev, "rescale_deviation"), (pub, "rescale_deviation_published"))))


def test_symmetry_findings_as_published_stand_beside_the_corrected_ones_and_read_their_metric():
    found = {f.key: f for f in analysis.symmetry_findings(_published_deviations(10.0))}
    keys = list(found)
    assert keys.index("deviation_rescale_total_published") == keys.index("deviation_rescale_total") + 1
    assert "deviation_rescale_timing_published" in found
    corrected, published = found["deviation_rescale_total"], found["deviation_rescale_total_published"]
    assert corrected.verdict != "held"  # the L2O equals Adam on its real step
    assert published.verdict == "held" and published.claim.startswith("(as published")
    # log10(10 * x / 1e-9) - log10(x / x') per seed: 1 + 9 above the corrected ratios
    assert np.mean(published.stats["log10(L2O / sgd)"]) == pytest.approx(
        np.mean(corrected.stats["log10(L2O / sgd)"]) + 10, abs=0.05)
    # without the published metric (older runs), only the corrected findings
    plain = _published_deviations(10.0)
    plain = Table({c: a[plain.cols["metric"] == "rescale_deviation"] for c, a in plain.cols.items()})
    assert not [f for f in analysis.symmetry_findings(plain) if f.key.endswith("_published")]


def test_noise_findings_as_published_read_the_float32_centred_alphas():
    T, S = 4, 3
    exact = {("sgd", None): np.full((T, S), 0.8), ("adam", None): np.full((T, S), 0.81),
             ("l2o", None): np.full((T, S), 0.79) + 0.001 * np.arange(S)}
    as_published = {**exact, ("l2o", None): exact[("l2o", None)] + 0.12}  # the residue raises the L2O's alpha
    t = _concat(*(_table(c, m, "noise") for c, m in (
        (exact, "alpha_update_pub"), (exact, "alpha_grad_pub"),
        (as_published, "alpha_update_pub_published"), (exact, "alpha_grad_pub_published"))))
    found = {f.key: f for f in analysis.noise_findings(t)}
    assert found["alpha_update_vs_baselines_pub"].verdict == "contradicted"  # 0.79 below Adam's 0.81
    published = found["alpha_update_vs_baselines_pub_published"]
    assert published.verdict == "held" and "as published" in published.claim
    assert published.stats["L2O minus adam"] == pytest.approx([0.1, 0.101, 0.102])
    assert "alpha_update_vs_baselines" not in found  # an estimator that was not recorded: no finding


# ---- several meta-training recipes ------------------------------------------------------------------
def test_labels_of_recipes_round_trip_with_meta_seed_marks():
    assert results.l2o_label("l2o", 0, "authors") == "l2o[authors]"
    assert results.l2o_label("l2o(leaky_relu)", 2, "authors") == "l2o[authors](leaky_relu)@m2"
    assert results.split_label("l2o[authors](leaky_relu)@m2") == ("l2o[authors](leaky_relu)", 2)
    assert results.split_recipe("l2o[authors](leaky_relu)@m2") == ("l2o(leaky_relu)@m2", "authors")
    assert results.split_recipe("l2o(leaky_relu)") == ("l2o(leaky_relu)", None)
    assert results.split_recipe("adam") == ("adam", None) and results.l2o_label("adam", 0, "authors") == "adam"


def test_findings_are_computed_per_recipe_each_on_its_own_l2o():
    # the default recipe's L2O deviates 10x less than SGD and Adam, the authors recipe's 10x more:
    # one finding, opposite verdicts, each decided on its own L2O against the same baselines
    S, T = 4, 30
    rng = np.random.default_rng(3)
    curves = {(o, None): 1.0 + 0.05 * rng.standard_normal((T, S)) for o in ("sgd", "adam", "lion")}
    curves[("l2o", None)] = 0.1 + 0.005 * rng.standard_normal((T, S))
    curves[(results.l2o_label("l2o", 0, "authors"), None)] = 10.0 + 0.5 * rng.standard_normal((T, S))
    t = _table(curves, metric="rescale_deviation", experiment="symmetry-breaking")
    assert analysis.recipes(t) == [None, "authors"]
    by_recipe = analysis.findings_by_recipe(t)
    (main,) = [f for f in by_recipe[None] if f.key == "deviation_rescale_total"]
    (authors,) = [f for f in by_recipe["authors"] if f.key == "deviation_rescale_total"]
    assert main.verdict == "contradicted" and authors.verdict == "held"
    assert main.stats["log10(L2O / adam)"] == pytest.approx([-1.0] * S, abs=0.1)
    assert authors.stats["log10(L2O / adam)"] == pytest.approx([1.0] * S, abs=0.1)
    assert authors.stats["adam"] == main.stats["adam"]  # the same baseline runs
    # the main recipe's findings are what they are without the other recipe's runs
    alone = _table({k: v for k, v in curves.items() if k[0] != "l2o[authors]"},
                   metric="rescale_deviation", experiment="symmetry-breaking")
    assert [f.stats for f in analysis.all_findings(alone)] == [f.stats for f in by_recipe[None]]


def test_a_recipe_view_keeps_its_meta_seeds_apart():
    curves = {("adam", None): np.ones((40, 5))}
    for k, off in enumerate([0.3, 0.25, 0.35]):
        curves[(results.l2o_label("l2o", k, "authors"), 0.0)] = 1 - off + np.zeros((40, 5))
    curves[("l2o", 0.0)] = 1.5 + np.zeros((40, 5))  # the main recipe: one L2O, behind Adam
    t = _table(curves)
    view = analysis.recipe_view(t, "authors")
    assert view.unique("optimizer") == ["adam", "l2o", "l2o@m1", "l2o@m2"] and analysis.meta_seeds(view) == 3
    assert analysis.recipe_view(t).unique("optimizer") == ["adam", "l2o"]
    fast = {r: [f for f in fs if f.key == "l2o_fast_start"][0] for r, fs in analysis.findings_by_recipe(t).items()}
    per_l2o = np.asarray(fast["authors"].stats["leaky_relu: first 5 iterations, Adam minus L2O"], dtype=float)
    assert per_l2o.shape == (3, 5) and per_l2o.mean(axis=1) == pytest.approx([0.3, 0.25, 0.35])  # (K, S)
    assert fast["authors"].verdict == "held" and fast[None].verdict == "contradicted"
