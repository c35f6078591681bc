"""Verdict functions on synthetic tables whose right answer is known by construction."""
import math

import numpy as np
import pytest

from l2o_dynamics import analysis
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
