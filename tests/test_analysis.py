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
    assert majority(["inconclusive-opposite", "weak"]) == "inconclusive-opposite"
    assert majority(["n/a"]) == "n/a"
    assert isinstance(paired({}, {}), Paired)


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
    assert early == pytest.approx([0.3, -0.2, 0.1], abs=0.002)
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
    assert len(f.stats["l2o"]) == 2  # one mean per usable L2O
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
    assert fast["authors"].stats["leaky_relu: first 5 iterations, Adam minus L2O"] == pytest.approx([0.3, 0.25, 0.35])
    assert fast["authors"].verdict == "held" and fast[None].verdict == "contradicted"
