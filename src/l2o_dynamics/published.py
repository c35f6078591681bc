"""The study's published values, read off its figures (approximate), for overlays.

Sobotka & Simanek (AAAI 2024 student abstract) publish figures, not data; the authors'
repository (Johnny1188/learning-to-optimize @10fabbf) holds the code but not the curves.
The values below were read off the published figures by eye (issue 17): each is a
(iteration, value) point, good to roughly +-10% of the value. They exist to be drawn
beside our curves (`plotting.study_overlay`) and quoted in docs/replication.md; no
analysis decides anything from them.

How the study computed each panel (docs/replication.md, from the authors' code):
- Fig. 1 deviations: |sum over units of the per-unit constraint expression| with the
  L2O's raw network output in place of its step (10x the step at eta = 0.1) and SGD's
  update taken as -lr * g (momentum ignored, hence exactly 0); mean over 3 runs.
- Fig. 3 right: largest eigenvalue of the covariance of the updates over 93 minibatches
  at checkpoints 1, 20, ..., 1000.
"""
from __future__ import annotations

import math

import numpy as np

from .analysis import per_seed
from .results import PUBLISHED

Points = tuple[tuple[int, float], ...]

# Fig. 1 left: rescale symmetry, leaky_relu optimizee; right: scale symmetry, bn_relu.
# Keyed (symmetry, optimizer) -> points, as plotted (the study's measurement, above). An early
# value given as "~x then ~y" or "peak ~x" is placed at the first checkpoint, it. 10.
FIG1: dict[tuple[str, str], Points] = {
    ("rescale", "l2o"): ((10, 24.0), (20, 30.0), (100, 50.0)),
    ("rescale", "lion"): ((100, 13.0),),  # rising gradually to ~13
    ("rescale", "adam"): ((10, 2.0), (100, 1.0)),
    ("rescale", "sgd"): ((10, 0.0), (100, 0.0)),
    ("scale", "l2o"): ((10, 52.0), (100, 14.0)),  # peak at it. 10, falling
    ("scale", "lion"): ((100, 68.0),),  # rising gradually to ~68
    ("scale", "adam"): ((10, 25.0), (100, 9.0)),  # peak, falling
    ("scale", "sgd"): ((10, 0.0), (100, 0.0)),
}
FIG1_OPTIMIZEE = {"rescale": "leaky_relu", "scale": "bn_relu"}

# Fig. 3 right: largest eigenvalue of the update covariance (leaky_relu), per checkpoint.
FIG3_COVARIANCE: dict[str, Points] = {
    "l2o": ((1, 0.1), (1000, 0.03)),
    "lion": ((20, 6e-3), (1000, 6e-3)),
    "adam": ((20, 3e-4), (1000, 3e-4)),
    "sgd": ((20, 3e-4), (1000, 3e-4)),
}

# The learning rates the study's baselines most likely used (the covariance at iteration 1
# implies them; the repository does not record them).
IMPLIED_LR = {"adam": 0.01, "lion": 0.005}


def fig1_as_step(points: Points, optimizer: str, eta: float = 0.1) -> Points:
    """The study's Fig. 1 values converted to what they would be with the L2O's step in place
    of its raw output: divided by 1/eta for the L2O, unchanged for the baselines."""
    scale = eta if optimizer.startswith("l2o") else 1.0
    return tuple((it, v * scale) for it, v in points)


# ---- our measurements beside the study's ------------------------------------------------------
FIG1_ITERATIONS = (10, 20, 100)
RECIPE_OPTIMIZERS = ("sgd", "adam", "lion", "l2o", "l2o[authors]")


def _mean_at(table, metric: str, step: int) -> float:
    """Mean over seeds of `metric` at `step` (NaN if absent, or if a seed diverged there:
    analysis.per_seed)."""
    values = list(per_seed(table.where(metric=metric), steps=(step, step)).values())
    return float(np.mean(values)) if values else math.nan


def _fmt(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3g}"


def _study_at(points: Points, iteration: int) -> float | None:
    return next((v for it, v in points if it == iteration), None)


def fig1_rows(table, eta: float = 0.1) -> tuple[list[str], list[list[str]]]:
    """Fig. 1, panel by panel: for each optimizer and iteration 10, 20, 100, the study's value
    (as plotted, and converted to the step for the L2O), ours as the study measured it
    (`{kind}_deviation_published`) and ours corrected (`{kind}_deviation`, the real step).
    Iteration i is the update at step index i - 1. Means over seeds; `table` is a reproduce
    run's metrics (results.Table) with the symmetry-breaking experiment."""
    t = table.where(experiment="symmetry-breaking")
    header = ["panel", "optimizer", "iteration", "study, as plotted", "study, as a step",
              "ours, as the study measured", "ours, corrected (the step)"]
    rows = []
    for kind, optimizee in FIG1_OPTIMIZEE.items():
        sub = t.where(optimizee=optimizee)
        for opt in RECIPE_OPTIMIZERS:
            run = sub.where(optimizer=opt)
            study = FIG1.get((kind, "l2o" if opt.startswith("l2o") else opt), ())
            if not len(run) and not study:
                continue
            for it in FIG1_ITERATIONS:
                plotted = _study_at(study, it)
                as_step = None if plotted is None else dict(fig1_as_step(((it, plotted),), opt, eta))[it]
                rows.append([f"{kind} ({optimizee})", opt, str(it), _fmt(plotted), _fmt(as_step),
                             _fmt(_mean_at(run, f"{kind}_deviation{PUBLISHED}", it - 1)),
                             _fmt(_mean_at(run, f"{kind}_deviation", it - 1))])
    return header, rows


def covariance_rows(table) -> tuple[list[str], list[list[str]]]:
    """Fig. 3 right: the largest eigenvalue of the update covariance per checkpoint, ours (mean
    over seeds, leaky_relu) beside the study's values where it gives one (iteration 1 is our
    step 0, the first update)."""
    t = table.where(experiment="noise", metric="cov_max_eig")
    steps = sorted(int(s) for s in t.unique("step")) if len(t) else []
    header = ["optimizer", "study (it. 1 / 20 / 1000)"] + [f"ours, step {s}" for s in steps]
    rows = []
    for opt in RECIPE_OPTIMIZERS:
        run = t.where(optimizer=opt)
        study = FIG3_COVARIANCE.get("l2o" if opt.startswith("l2o") else opt, ())
        if not len(run):
            continue
        given = " / ".join(_fmt(_study_at(study, it)) for it in (1, 20, 1000))
        rows.append([opt, given] + [_fmt(_mean_at(run, "cov_max_eig", s)) for s in steps])
    return header, rows
