"""The study's findings, tested on tidy metrics: pure functions of a `results.Table`.

Each finding is a claim of the study turned into a per-seed statistic. Runs with
the same seed share their init and data order across optimizers, so comparisons
use paired differences over seeds with a 95% t-interval:

    held  -- the mean difference has the claimed sign and its interval excludes 0
    weak  -- the claimed sign, but the interval includes 0 (too few seeds to tell)
    no    -- the opposite sign
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from .results import Table

LEVEL = 0.95


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t-interval over seeds (low = high = mean for 1 seed)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def fmt(values: Sequence[float] | tuple[float, float, float], digits: int = 3) -> str:
    """'mean [low, high]' of per-seed values (or of a precomputed interval)."""
    m, lo, hi = values if isinstance(values, tuple) and len(values) == 3 else interval(values)
    if not np.isfinite(m):
        return "n/a"
    g = lambda x: f"{x:.{digits}g}"  # noqa: E731
    return g(m) if lo == hi else f"{g(m)} [{g(lo)}, {g(hi)}]"


@dataclass
class Finding:
    key: str
    claim: str  # the study's statement
    measure: str  # what was computed
    values: dict[str, str]  # label -> "mean [low, high]"
    verdict: str  # held | weak | no | n/a
    figure: str | None = None


def per_seed(table: Table, reduce: Callable[[np.ndarray, np.ndarray], float] | None = None,
             steps: tuple[int, int] | None = None) -> dict[int, float]:
    """One number per seed from the one metric/run in `table`: the mean over `steps`
    [lo, hi] (inclusive) by default, or reduce(steps, values)."""
    if not len(table):
        return {}
    st, seeds, vals = table.matrix()
    if steps is not None:
        keep = (st >= steps[0]) & (st <= steps[1])
        st, vals = st[keep], vals[keep]
    out = {}
    for j, s in enumerate(seeds):
        col = vals[:, j]
        out[int(s)] = float(reduce(st, col) if reduce else np.nanmean(col))
    return out


def paired(a: dict[int, float], b: dict[int, float], transform=lambda x, y: x - y) -> list[float]:
    return [transform(a[s], b[s]) for s in sorted(set(a) & set(b))
            if np.isfinite(a[s]) and np.isfinite(b[s])]


def verdict(diffs: Sequence[float]) -> str:
    m, lo, hi = interval(diffs)
    if not np.isfinite(m):
        return "n/a"
    if m > 0:
        return "held" if lo > 0 else "weak"
    return "no"


def log_ratio(x: float, y: float) -> float:
    """log10(x / y): the paired statistic for quantities that span decades."""
    tiny = 1e-30
    return math.log10(max(x, tiny) / max(y, tiny))


# ---- symmetry breaking ----------------------------------------------------------------------------------
SYM_PANELS = (("leaky_relu", "rescale"), ("bn_relu", "scale"))


def symmetry_findings(t: Table) -> list[Finding]:
    """Per panel of Figure 1 (rescale on leaky_relu, scale on bn_relu): L2O deviates more
    than SGD and Adam (studied and scale-free measures); L2O rises early, Lion later."""
    t = t.where(experiment="symmetry-breaking")
    out = []
    for optimizee, kind in SYM_PANELS:
        panel = t.where(optimizee=optimizee)
        if not len(panel):
            continue
        for suffix, name in (("", "total"), ("_rel", "rel")):
            sub = panel.where(metric=f"{kind}_deviation{suffix}")
            means = {o: per_seed(sub.where(optimizer=o)) for o in ("sgd", "adam", "lion", "l2o")}
            vals = {o: fmt(list(m.values())) for o, m in means.items()}
            diffs = {b: paired(means["l2o"], means[b], log_ratio) for b in ("sgd", "adam")}
            vals.update({f"log10(L2O / {b})": fmt(d) for b, d in diffs.items()})
            claim = (f"{kind.capitalize()} symmetry ({optimizee}): the L2O's updates deviate from the "
                     "geometric constraint much more than SGD's and Adam's.")
            if name == "rel":
                claim = f"(companion) {kind.capitalize()} symmetry ({optimizee}), scale-free measure: the same."
            out.append(Finding(
                f"deviation_{kind}_{name}", claim,
                f"mean over iterations of `{kind}_deviation{suffix}` per seed; paired log10 ratio L2O / baseline",
                vals, _combine([verdict(d) for d in diffs.values()]),
                "symmetry_breaking.png" if name == "total" else "symmetry_breaking_rel.png"))
        sub = panel.where(metric=f"{kind}_deviation")
        T = int(sub.cols["step"].max())
        half = {o: per_seed(sub.where(optimizer=o), reduce=_rise_time) for o in ("l2o", "lion")}
        end = {o: per_seed(sub.where(optimizer=o), steps=(int(0.9 * T), T)) for o in ("l2o", "lion")}
        d_early = paired(half["lion"], half["l2o"])  # > 0: L2O reaches half its peak sooner
        d_late = paired(end["lion"], end["l2o"], log_ratio)  # > 0: Lion higher at the end
        out.append(Finding(
            f"deviation_{kind}_timing",
            f"{kind.capitalize()} symmetry ({optimizee}): symmetry breaking rises fastest for the L2O at the "
            "beginning, while Lion's rises more gradually and ends higher.",
            "per seed: the first iteration where the deviation reaches half its maximum (L2O before "
            "Lion?) and the mean deviation over the last 10% of iterations (Lion above L2O?)",
            {"half-peak iteration, L2O": fmt(list(half["l2o"].values())),
             "half-peak iteration, Lion": fmt(list(half["lion"].values())),
             "Lion minus L2O (iterations)": fmt(d_early),
             "last 10%, log10(Lion / L2O)": fmt(d_late)},
            _combine([verdict(d_early), verdict(d_late)]), "symmetry_breaking.png"))
    return out


def _rise_time(steps: np.ndarray, values: np.ndarray) -> float:
    v = np.nan_to_num(values, nan=0.0)
    peak = v.max()
    return float(steps[np.argmax(v >= 0.5 * peak)]) if peak > 0 else math.nan


def _combine(verdicts: Sequence[str]) -> str:
    s = set(verdicts)
    if not s or s == {"n/a"}:
        return "n/a"
    return "no" if "no" in s else ("weak" if "weak" in s else "held")


# ---- regularisation -----------------------------------------------------------------------------------
def auc(t: Table) -> dict[int, float]:
    """Per seed: the mean minibatch training loss over the run (area under the curve / T)."""
    return per_seed(t.where(metric="train_loss"))


def regularization_findings(t: Table) -> list[Finding]:
    out = []
    reg = t.where(experiment="regularization", optimizer="l2o")
    if len(reg):
        vals, diffs = {}, []
        for optimizee in reg.unique("optimizee"):
            sub = reg.where(optimizee=optimizee)
            betas = [b for b in sub.unique("beta") if b is not None]
            by_beta = {b: auc(sub.where(beta=b)) for b in betas}
            for b in betas:
                vals[f"{optimizee}: beta={b:g}"] = fmt(list(by_beta[b].values()))
            if len(betas) >= 2:
                lo_b, hi_b = min(betas), max(betas)
                d = paired(by_beta[hi_b], by_beta[lo_b])
                diffs.append(d)
                vals[f"{optimizee}: beta={hi_b:g} minus beta={lo_b:g}"] = fmt(d)
                means = [np.nanmean(list(by_beta[b].values())) for b in betas]
                rho = stats.spearmanr(betas, means).statistic if len(betas) > 2 else float(np.sign(means[-1] - means[0]))
                vals[f"{optimizee}: Spearman(beta, mean loss)"] = f"{rho:.2f}"
        out.append(Finding(
            "regularization_slowdown",
            "As the symmetry-breaking regularization increases, the L2O's speed of optimization drops.",
            "mean training loss over the meta-test run (area under the curve) per seed, by beta; "
            "paired difference largest beta minus beta = 0",
            vals, _combine([verdict(d) for d in diffs]), "regularization.png"))
    gen = t.where(experiment="generalization")
    if len(gen):
        vals, verdicts = {}, []
        for opt in gen.unique("optimizer"):
            for optimizee in gen.where(optimizer=opt).unique("optimizee"):
                sub = gen.where(optimizer=opt, optimizee=optimizee)
                betas = [b for b in sub.unique("beta") if b is not None]
                if len(betas) < 2:
                    continue
                d = paired(auc(sub.where(beta=max(betas))), auc(sub.where(beta=min(betas))))
                verdicts.append(verdict(d))
                vals[f"{opt} on {optimizee}: beta={max(betas):g} minus beta={min(betas):g}"] = fmt(d)
        n_slow = sum(v in ("held", "weak") for v in verdicts)
        n_sig = sum(v == "held" for v in verdicts)
        frac = n_slow / len(verdicts) if verdicts else math.nan
        v = "n/a" if not verdicts else ("held" if n_sig > len(verdicts) / 2 else
                                         "weak" if frac > 0.5 else "no")
        out.append(Finding(
            "regularization_unseen",
            "The slowdown from regularization also shows on most optimizee architectures the L2O was "
            "not meta-trained on.",
            "paired difference of the mean training loss, largest beta minus beta = 0, per unseen "
            f"optimizee; slower in {n_slow} of {len(verdicts)} (significant in {n_sig})",
            vals, v, "generalization.png"))
    return out


# ---- noise -------------------------------------------------------------------------------------------
def noise_findings(t: Table) -> list[Finding]:
    t = t.where(experiment="noise", optimizee="leaky_relu")
    out = []
    if not len(t):
        return out
    opts = [o for o in ("sgd", "adam", "lion", "l2o") if o in t.unique("optimizer")]
    if "l2o" not in opts:
        return out
    for suffix, name in (("", "pooled estimator (the study's)"), ("_std", "standardised estimator")):
        au = {o: per_seed(t.where(optimizer=o, metric=f"alpha_update{suffix}")) for o in opts}
        ag = {o: per_seed(t.where(optimizer=o, metric=f"alpha_grad{suffix}")) for o in opts}
        vals = {}
        for o in opts:
            vals[f"alpha_update {o}"] = fmt(list(au[o].values()))
            vals[f"alpha_grad {o}"] = fmt(list(ag[o].values()))
        base = [o for o in ("sgd", "adam") if o in opts]
        d1 = {o: paired(au["l2o"], au[o]) for o in base}
        out.append(Finding(
            f"alpha_update_vs_baselines{suffix}",
            "The noise in the L2O's updates is less heavy-tailed (larger alpha) than the updates of "
            f"SGD and Adam. [{name}]",
            f"mean over checkpoints of alpha_update{suffix} per seed; paired L2O minus baseline",
            {**{k: v for k, v in vals.items() if k.startswith("alpha_update")},
             **{f"L2O minus {o}": fmt(d) for o, d in d1.items()}},
            _combine([verdict(d) for d in d1.values()]), "noise.png" if not suffix else "noise_std.png"))
        d2 = paired(au["l2o"], ag["l2o"])
        out.append(Finding(
            f"alpha_update_vs_grad{suffix}",
            f"The L2O's update noise is much less heavy-tailed than its gradient noise. [{name}]",
            f"alpha_update{suffix} minus alpha_grad{suffix} on the L2O's run, per seed",
            {"alpha_update L2O": vals["alpha_update l2o"], "alpha_grad L2O": vals["alpha_grad l2o"],
             "difference": fmt(d2)}, verdict(d2), "noise.png" if not suffix else "noise_std.png"))
        gain = {o: {s: au[o][s] - ag[o][s] for s in set(au[o]) & set(ag[o])} for o in opts}
        d3 = {o: paired(gain["l2o"], gain[o]) for o in base}
        out.append(Finding(
            f"noise_filtering{suffix}",
            f"This filtering of gradient noise is much more pronounced for the L2O than for the "
            f"baselines. [{name}]",
            f"(alpha_update - alpha_grad){suffix} per seed; paired L2O minus baseline",
            {**{f"filtering {o}": fmt(list(gain[o].values())) for o in opts},
             **{f"L2O minus {o}": fmt(d) for o, d in d3.items()}},
            _combine([verdict(d) for d in d3.values()]), "noise.png" if not suffix else "noise_std.png"))
    eig = {o: per_seed(t.where(optimizer=o, metric="cov_max_eig")) for o in opts}
    base = [o for o in ("sgd", "adam") if o in opts]
    d4 = {o: paired(eig["l2o"], eig[o], log_ratio) for o in base}
    out.append(Finding(
        "cov_max_eig",
        "The L2O's updates vary more across minibatches: a larger largest eigenvalue of the update "
        "covariance than SGD and Adam.",
        "mean over checkpoints of cov_max_eig per seed; paired log10 ratio L2O / baseline",
        {**{f"cov_max_eig {o}": fmt(list(eig[o].values())) for o in opts},
         **{f"log10(L2O / {o})": fmt(d) for o, d in d4.items()}},
        _combine([verdict(d) for d in d4.values()]), "noise.png"))
    return out


# ---- L2O vs Adam ------------------------------------------------------------------------------------
def speed_table(t: Table, steps: Sequence[int] = (25, 50, 100, 200)) -> list[dict]:
    """Training loss at given iterations (mean over a +-2 window, per seed), the plain
    L2O next to the baselines, on each optimizee of the regularization experiment."""
    rows = []
    t = t.where(experiment="regularization", metric="train_loss")
    for optimizee in t.unique("optimizee"):
        for opt in ("sgd", "adam", "lion", "l2o"):
            sub = t.where(optimizee=optimizee, optimizer=opt)
            if opt == "l2o":
                sub = sub.where(beta=0.0)
            if not len(sub):
                continue
            T = int(sub.cols["step"].max()) + 1
            row = {"optimizee": optimizee, "optimizer": opt}
            for s in steps:
                s_ = min(s, T) - 1
                row[s] = interval(list(per_seed(sub, steps=(max(s_ - 2, 0), s_)).values()))
            rows.append(row)
    return rows


def l2o_vs_adam(t: Table) -> Finding | None:
    vals, diffs = {}, []
    reg = t.where(experiment="regularization", metric="train_loss")
    for optimizee in reg.unique("optimizee"):
        a = reg.where(optimizee=optimizee, optimizer="adam")
        l = reg.where(optimizee=optimizee, optimizer="l2o", beta=0.0)
        if not len(a) or not len(l):
            continue
        T = int(a.cols["step"].max())
        early = (0, max(T // 8, 1))
        d = paired(per_seed(a, steps=early), per_seed(l, steps=early))
        diffs.append(d)
        vals[f"{optimizee}: first {early[1] + 1} iterations, Adam minus L2O"] = fmt(d)
        dl = paired(per_seed(a, steps=(T - 9, T)), per_seed(l, steps=(T - 9, T)))
        vals[f"{optimizee}: last 10 iterations, Adam minus L2O"] = fmt(dl)
    if not diffs:
        return None
    return Finding(
        "l2o_fast_start",
        "The L2O's strength is its fast early descent (it beats Adam early in the run).",
        "paired difference of the mean minibatch training loss, Adam minus L2O, over the first "
        "eighth and the last 10 iterations", vals, _combine([verdict(d) for d in diffs]),
        "regularization.png")


def all_findings(t: Table) -> list[Finding]:
    out = []
    out += symmetry_findings(t)
    out += regularization_findings(t)
    out += noise_findings(t)
    f = l2o_vs_adam(t)
    if f:
        out.append(f)
    return out
