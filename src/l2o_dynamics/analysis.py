"""The study's findings, tested on tidy metrics: pure functions of a `results.Table`.

Each finding is a claim of the study turned into a per-seed statistic. Runs with
the same seed share their init and data order across optimizers, so comparisons
use paired differences over seeds with a 95% t-interval:

    held  -- the mean difference has the claimed sign and its interval excludes 0
    weak  -- the claimed sign, but the interval includes 0 (too few seeds to tell)
    (see VERDICTS for all four levels and n/a)

Meta-training seeds. With one meta-trained L2O per setting, the intervals cover
meta-test seeds only. With several (a profile's `meta_seeds`; their runs are
labelled `l2o@m1`, `l2o@m2`, ... beside `l2o`), every finding is computed once per
L2O, each statistic is averaged over the meta-test seeds, and the interval is over
the L2Os (`across_l2os`): the variation between meta-trainings is then part of it.

Recipes. The L2Os of further meta-training recipes (labelled `l2o[authors]`, ... beside
the main recipe's `l2o`) get findings of their own: `recipe_view` is the table with one
recipe's L2Os under the plain label and every baseline run, and `findings_by_recipe`
computes every finding on each view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from .results import Table, split_label, split_recipe

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
    verdict: str  # one of VERDICTS
    figure: str | None = None
    stats: dict[str, list[float]] = field(default_factory=dict)  # label -> the per-seed values behind it
    tests: tuple[str, ...] = ()  # the labels in `stats` whose verdicts decide the finding
    rule: str = "all"  # how: "all" (the weakest test decides) or "most" (majority)


def per_seed(table: Table, reduce: Callable[[np.ndarray, np.ndarray], float] | None = None,
             steps: tuple[int, int] | None = None) -> dict[int, float]:
    """One number per seed from the one metric/run in `table`: the mean over `steps`
    [lo, hi] (inclusive) by default, or reduce(steps, values). A seed whose run has a
    non-finite value in the window (it diverged) gets NaN, never a mean over what is
    left; `paired` and `verdict` then count it as unusable."""
    if not len(table):
        return {}
    st, seeds, vals = table.matrix()
    if steps is not None:
        keep = (st >= steps[0]) & (st <= steps[1])
        st, vals = st[keep], vals[keep]
    out = {}
    for j, s in enumerate(seeds):
        col = vals[:, j]
        if not np.all(np.isfinite(col)):
            out[int(s)] = math.nan
        else:
            out[int(s)] = float(reduce(st, col) if reduce else col.mean())
    return out


class Paired(list):
    """Per-seed paired statistics (finite ones only), with `diverged`: how many seeds
    were left out because a run of either side was not finite."""

    diverged: int = 0


def paired(a: dict[int, float], b: dict[int, float], transform=lambda x, y: x - y) -> Paired:
    common = sorted(set(a) & set(b))
    out = Paired(transform(a[s], b[s]) for s in common if np.isfinite(a[s]) and np.isfinite(b[s]))
    out.diverged = len(common) - len(out)
    return out


# Four levels for a claimed direction (> 0), from the 95% interval of the paired statistic:
VERDICTS = ("held", "weak", "inconclusive-opposite", "contradicted", "n/a")
MIN_SEEDS = 3  # fewer usable seeds: no verdict (an interval from 1-2 seeds says nothing)


def verdict(diffs: Sequence[float]) -> str:
    """held: mean > 0, interval excludes 0; weak: mean > 0, interval includes 0;
    inconclusive-opposite: mean <= 0, interval includes 0; contradicted: interval below 0;
    n/a: fewer than MIN_SEEDS finite values."""
    v = [x for x in diffs if np.isfinite(x)]
    if len(v) < MIN_SEEDS:
        return "n/a"
    m, lo, hi = interval(v)
    if m > 0:
        return "held" if lo > 0 else "weak"
    return "contradicted" if hi < 0 else "inconclusive-opposite"


def diverged_note(*diffs: Sequence[float]) -> dict[str, str]:
    """{'diverged runs left out': 'n'} when any paired statistic dropped seeds, else {}."""
    n = sum(getattr(d, "diverged", 0) for d in diffs)
    return {"seeds left out (a run diverged)": str(n)} if n else {}


def log_ratio(x: float, y: float) -> float:
    """log10(x / y): the paired statistic for quantities that span decades."""
    tiny = 1e-30
    return math.log10(max(x, tiny) / max(y, tiny))


def finding(key: str, claim: str, measure: str, stats: dict[str, Sequence[float] | str],
            tests: Sequence[str], figure: str | None, rule: str = "all") -> Finding:
    """A Finding from per-seed statistics: each one shown as 'mean [low, high]' (a str is
    shown as is); the verdict from the `tests` under `rule`, with the seeds that a
    diverged run took out of them counted."""
    verdicts = [verdict(stats[t]) for t in tests]
    values = {k: v if isinstance(v, str) else fmt(list(v)) for k, v in stats.items()}
    if rule == "most":
        values["verdicts of the comparisons"] = majority_summary(verdicts)
    values.update(diverged_note(*(stats[t] for t in tests)))
    return Finding(key, claim, measure, values, RULES[rule](verdicts), figure,
                   {k: v if isinstance(v, Paired) else list(v) for k, v in stats.items() if not isinstance(v, str)},
                   tuple(tests), rule)


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
            stats: dict = {o: list(m.values()) for o, m in means.items()}
            tests = [f"log10(L2O / {b})" for b in ("sgd", "adam")]
            stats.update({lbl: paired(means["l2o"], means[b], log_ratio) for lbl, b in zip(tests, ("sgd", "adam"))})
            claim = (f"{kind.capitalize()} symmetry ({optimizee}): the L2O's updates deviate from the "
                     "geometric constraint much more than SGD's and Adam's.")
            if name == "rel":
                claim = f"(companion) {kind.capitalize()} symmetry ({optimizee}), scale-free measure: the same."
            out.append(finding(
                f"deviation_{kind}_{name}", claim,
                f"mean over iterations of `{kind}_deviation{suffix}` per seed; paired log10 ratio L2O / baseline",
                stats, tests, "symmetry_breaking.png" if name == "total" else "symmetry_breaking_rel.png"))
        sub = panel.where(metric=f"{kind}_deviation")
        T = int(sub.cols["step"].max())
        half = {o: per_seed(sub.where(optimizer=o), reduce=rise_time) for o in ("l2o", "lion")}
        end = {o: per_seed(sub.where(optimizer=o), steps=(int(0.9 * T), T)) for o in ("l2o", "lion")}
        stats = {"half-total iteration, L2O": list(half["l2o"].values()),
                 "half-total iteration, Lion": list(half["lion"].values()),
                 # > 0: the L2O reaches half its total sooner; Lion higher at the end
                 "Lion minus L2O (iterations)": paired(half["lion"], half["l2o"]),
                 "last 10%, log10(Lion / L2O)": paired(end["lion"], end["l2o"], log_ratio)}
        out.append(finding(
            f"deviation_{kind}_timing",
            f"{kind.capitalize()} symmetry ({optimizee}): symmetry breaking rises fastest for the L2O at the "
            "beginning, while Lion's rises more gradually and ends higher.",
            "per seed: the iteration at which the cumulative deviation reaches half its total (L2O "
            "before Lion?) and the mean deviation over the last 10% of iterations (Lion above L2O?)",
            stats, ["Lion minus L2O (iterations)", "last 10%, log10(Lion / L2O)"], "symmetry_breaking.png"))
    return out


def rise_time(steps: np.ndarray, values: np.ndarray) -> float:
    """The step at which the cumulative deviation reaches half its total (robust to one
    spike, unlike the first step at half the maximum); NaN if the total is not positive."""
    cum = np.cumsum(np.abs(values))
    total = cum[-1] if len(cum) else 0.0
    if not np.isfinite(total) or total <= 0:
        return math.nan
    return float(steps[int(np.searchsorted(cum, 0.5 * total))])


def _combine(verdicts: Sequence[str]) -> str:
    """A claim made of several comparisons holds only as well as its weakest one; n/a if
    any comparison has no verdict."""
    s = set(verdicts)
    if not s or "n/a" in s:
        return "n/a"
    for level in ("contradicted", "inconclusive-opposite", "weak"):
        if level in s:
            return level
    return "held"


# ---- regularisation -----------------------------------------------------------------------------------
def auc(t: Table) -> dict[int, float]:
    """Per seed: the mean minibatch training loss over the run (area under the curve / T)."""
    return per_seed(t.where(metric="train_loss"))


def regularization_findings(t: Table) -> list[Finding]:
    out = []
    reg = t.where(experiment="regularization", optimizer="l2o")
    if len(reg):
        stats: dict = {}
        tests = []
        for optimizee in reg.unique("optimizee"):
            sub = reg.where(optimizee=optimizee)
            betas = [b for b in sub.unique("beta") if b is not None]
            by_beta = {b: auc(sub.where(beta=b)) for b in betas}
            for b in betas:
                stats[f"{optimizee}: beta={b:g}"] = list(by_beta[b].values())
            if len(betas) >= 2:
                lo_b, hi_b = min(betas), max(betas)
                stats[f"{optimizee}: beta={hi_b:g} minus beta={lo_b:g}"] = paired(by_beta[hi_b], by_beta[lo_b])
                tests.append(f"{optimizee}: slope of mean loss on beta (per unit beta)")
                stats[tests[-1]] = beta_slopes(by_beta)
        out.append(finding(
            "regularization_slowdown",
            "As the symmetry-breaking regularization increases, the L2O's speed of optimization drops.",
            "mean training loss over the meta-test run (area under the curve) per seed and beta; per "
            "seed the least-squares slope of that loss on beta over all betas (a trend, > 0: slower "
            "with more regularisation), its interval over seeds",
            stats, tests, "regularization.png"))
    gen = t.where(experiment="generalization")
    if len(gen):
        stats = {}
        for opt in gen.unique("optimizer"):
            for optimizee in gen.where(optimizer=opt).unique("optimizee"):
                sub = gen.where(optimizer=opt, optimizee=optimizee)
                betas = [b for b in sub.unique("beta") if b is not None]
                if len(betas) >= 2:
                    stats[f"{opt} on {optimizee}: slope of mean loss on beta"] = beta_slopes(
                        {b: auc(sub.where(beta=b)) for b in betas})
        out.append(finding(
            "regularization_unseen",
            "The slowdown from regularization also shows on most optimizee architectures the L2O was "
            "not meta-trained on.",
            "per unseen optimizee, the per-seed slope of the mean training loss on beta; the claim "
            "holds as a majority of those comparisons", stats, list(stats), "generalization.png",
            rule="most"))
    return out


def beta_slopes(by_beta: dict[float, dict[int, float]]) -> Paired:
    """Per seed (present at every beta, all finite), the least-squares slope of the value on
    beta: the paired trend statistic over all betas."""
    betas = sorted(by_beta)
    seeds = sorted(set.intersection(*(set(by_beta[b]) for b in betas)))
    x = np.asarray(betas, dtype=float)
    out = Paired()
    for s in seeds:
        y = np.asarray([by_beta[b][s] for b in betas], dtype=float)
        if np.all(np.isfinite(y)) and np.ptp(x) > 0:
            out.append(float(np.polyfit(x, y, 1)[0]))
        else:
            out.diverged += 1
    return out


def majority(verdicts: Sequence[str]) -> str:
    """'Most of several comparisons': held if more than half are held; weak if more than
    half point the claimed way; contradicted if more than half are contradicted;
    inconclusive-opposite otherwise; n/a with fewer than MIN_SEEDS usable comparisons."""
    usable = [v for v in verdicts if v != "n/a"]
    if not usable:
        return "n/a"
    half = len(usable) / 2
    if sum(v == "held" for v in usable) > half:
        return "held"
    if sum(v in ("held", "weak") for v in usable) > half:
        return "weak"
    if sum(v == "contradicted" for v in usable) > half:
        return "contradicted"
    return "inconclusive-opposite"


def majority_summary(verdicts: Sequence[str]) -> str:
    counts = {lvl: sum(v == lvl for v in verdicts) for lvl in VERDICTS}
    return ", ".join(f"{n} {lvl}" for lvl, n in counts.items() if n) or "no comparisons"


RULES = {"all": _combine, "most": majority}  # Finding.rule -> how its tests' verdicts combine


# ---- noise -------------------------------------------------------------------------------------------
def noise_findings(t: Table) -> list[Finding]:
    t = t.where(experiment="noise", optimizee="leaky_relu")
    out = []
    if not len(t):
        return out
    opts = [o for o in ("sgd", "adam", "lion", "l2o") if o in t.unique("optimizer")]
    if "l2o" not in opts:
        return out
    from .noise import ESTIMATOR_LABELS

    base = [o for o in ("sgd", "adam") if o in opts]
    for suffix, name in ESTIMATOR_LABELS.items():
        au = {o: per_seed(t.where(optimizer=o, metric=f"alpha_update{suffix}")) for o in opts}
        ag = {o: per_seed(t.where(optimizer=o, metric=f"alpha_grad{suffix}")) for o in opts}
        tests = [f"L2O minus {o}" for o in base]
        out.append(finding(
            f"alpha_update_vs_baselines{suffix}",
            "The noise in the L2O's updates is less heavy-tailed (larger alpha) than the updates of "
            f"SGD and Adam. [{name}]",
            f"mean over checkpoints of alpha_update{suffix} per seed; paired L2O minus baseline",
            {**{f"alpha_update {o}": list(au[o].values()) for o in opts},
             **{lbl: paired(au["l2o"], au[o]) for lbl, o in zip(tests, base)}}, tests, "noise.png"))
        out.append(finding(
            f"alpha_update_vs_grad{suffix}",
            f"The L2O's update noise is much less heavy-tailed than its gradient noise. [{name}]",
            f"alpha_update{suffix} minus alpha_grad{suffix} on the L2O's run, per seed",
            {"alpha_update L2O": list(au["l2o"].values()), "alpha_grad L2O": list(ag["l2o"].values()),
             "difference": paired(au["l2o"], ag["l2o"])}, ["difference"], "noise.png"))
        gain = {o: {s: au[o][s] - ag[o][s] for s in set(au[o]) & set(ag[o])} for o in opts}
        out.append(finding(
            f"noise_filtering{suffix}",
            f"This filtering of gradient noise is much more pronounced for the L2O than for the "
            f"baselines. [{name}]",
            f"(alpha_update - alpha_grad){suffix} per seed; paired L2O minus baseline",
            {**{f"filtering {o}": list(gain[o].values()) for o in opts},
             **{lbl: paired(gain["l2o"], gain[o]) for lbl, o in zip(tests, base)}}, tests, "noise.png"))
    eig = {o: per_seed(t.where(optimizer=o, metric="cov_max_eig")) for o in opts}
    tests = [f"log10(L2O / {o})" for o in base]
    out.append(finding(
        "cov_max_eig",
        "The L2O's updates vary more across minibatches: a larger largest eigenvalue of the update "
        "covariance than SGD and Adam.",
        "mean over checkpoints of cov_max_eig per seed; paired log10 ratio L2O / baseline",
        {**{f"cov_max_eig {o}": list(eig[o].values()) for o in opts},
         **{lbl: paired(eig["l2o"], eig[o], log_ratio) for lbl, o in zip(tests, base)}}, tests, "noise.png"))
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
    stats, tests = {}, []
    reg = t.where(experiment="regularization", metric="train_loss")
    for optimizee in reg.unique("optimizee"):
        a = reg.where(optimizee=optimizee, optimizer="adam")
        l = reg.where(optimizee=optimizee, optimizer="l2o", beta=0.0)
        if not len(a) or not len(l):
            continue
        T = int(a.cols["step"].max())
        early = (0, max(T // 8, 1))
        tests.append(f"{optimizee}: first {early[1] + 1} iterations, Adam minus L2O")
        stats[tests[-1]] = paired(per_seed(a, steps=early), per_seed(l, steps=early))
        stats[f"{optimizee}: last 10 iterations, Adam minus L2O"] = paired(
            per_seed(a, steps=(T - 9, T)), per_seed(l, steps=(T - 9, T)))
    if not tests:
        return None
    return finding(
        "l2o_fast_start",
        "The L2O's strength is its fast early descent (it beats Adam early in the run).",
        "paired difference of the mean minibatch training loss, Adam minus L2O, over the first "
        "eighth and the last 10 iterations", stats, tests, "regularization.png")


RUN = ("experiment", "optimizee", "optimizer", "beta", "seed")  # the columns naming one run


def mask_diverged(t: Table) -> Table:
    """Every value of a run flagged `diverged` = 1 (runner.meta_test) set to NaN, so
    each statistic leaves that seed out and counts it, whichever window it reads
    (a run may still look finite before it blew up)."""
    flags = t.where(metric="diverged")
    bad = {tuple(str(flags.cols[c][i]) for c in RUN) for i in np.flatnonzero(flags.cols["value"] != 0)}
    if not bad:
        return t
    hit = np.array([tuple(str(t.cols[c][i]) for c in RUN) in bad for i in range(len(t))], dtype=bool)
    return Table({**t.cols, "value": np.where(hit, math.nan, t.cols["value"])})


def findings_of_one(t: Table) -> list[Finding]:
    """Every finding, for tables with one L2O per setting (label `l2o`)."""
    out = []
    out += symmetry_findings(t)
    out += regularization_findings(t)
    out += noise_findings(t)
    f = l2o_vs_adam(t)
    if f:
        out.append(f)
    return out


def all_findings(t: Table, recipe: str | None = None) -> list[Finding]:
    """Every finding of one recipe's L2Os (None: the main recipe's, labelled `l2o`); with
    several meta-training seeds, intervals over the L2Os."""
    return across_l2os([findings_of_one(v) for v in l2o_views(mask_diverged(recipe_view(t, recipe)))])


# ---- several meta-training recipes -------------------------------------------------------------
def recipes(t: Table) -> list[str | None]:
    """The recipes whose L2Os the table holds: None (the main one, plain `l2o` labels) first,
    then the further ones (`l2o[NAME]`) by name."""
    found = {split_recipe(o)[1] for o in t.unique("optimizer") if o.startswith("l2o")}
    further = sorted(r for r in found if r is not None)
    return [None] + further if None in found or not further else further


def recipe_view(t: Table, recipe: str | None = None) -> Table:
    """The runs of recipe `recipe`'s L2Os under their labels without the recipe mark
    (`l2o[authors](leaky_relu)@m1` -> `l2o(leaky_relu)@m1`), and every run that is not an
    L2O's, as they are."""
    labels, row = np.unique(t.cols["optimizer"].astype(str), return_inverse=True)
    split = [split_recipe(o) for o in labels]
    if recipe is None and all(r is None for _, r in split):
        return t
    keep_label = np.asarray([not o.startswith("l2o") or r == recipe for o, (_, r) in zip(labels, split)], dtype=bool)
    plain = np.asarray([name for name, _ in split], dtype=object)
    keep = keep_label[row] if len(labels) else np.zeros(0, dtype=bool)
    return Table({**{c: a[keep] for c, a in t.cols.items()}, "optimizer": plain[row][keep]})


def findings_by_recipe(t: Table) -> dict[str | None, list[Finding]]:
    """Every finding per recipe's L2Os (`all_findings` of each `recipe_view`), main recipe first."""
    return {r: all_findings(t, r) for r in recipes(t)}


# ---- several meta-training seeds ---------------------------------------------------------------
def meta_seeds(t: Table) -> int:
    """How many meta-trained L2Os per setting the table holds (1 + the largest `@mK`)."""
    return 1 + max((split_label(o)[1] for o in t.unique("optimizer")), default=0)


def _split_labels(t: Table) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the optimizer's plain label and its meta-training seed (split once per
    distinct label)."""
    labels, row = np.unique(t.cols["optimizer"].astype(str), return_inverse=True)
    names, ks = zip(*map(split_label, labels)) if len(labels) else ((), ())
    return np.asarray(names, dtype=object)[row], np.asarray(ks, dtype=np.int64)[row]


def l2o_views(t: Table) -> list[Table]:
    """One table per meta-training seed k: the runs of the L2Os of seed k under their plain
    label (`l2o`, `l2o(trained_on)`), every other run as it is."""
    if meta_seeds(t) == 1:
        return [t]
    names, ks = _split_labels(t)
    is_l2o = np.char.startswith(names.astype(str), "l2o")
    views = []
    for k in range(meta_seeds(t)):
        keep = ~is_l2o | (ks == k)
        views.append(Table({**{c: a[keep] for c, a in t.cols.items()}, "optimizer": names[keep]}))
    return views


SEED_STRIDE = 1_000_000  # pooled tables: the run of meta seed k on test seed s is seed s + k * stride


def pool_l2os(t: Table) -> Table:
    """Every meta-training seed's L2O runs under the plain label, each (L2O, test seed) a
    seed of its own: curves and summary tables over all L2Os (never paired statistics)."""
    if meta_seeds(t) == 1:
        return t
    names, ks = _split_labels(t)
    return Table({**t.cols, "optimizer": names, "seed": t.cols["seed"] + SEED_STRIDE * ks})


def across_l2os(per_l2o: list[list[Finding]]) -> list[Finding]:
    """Findings of K meta-trained L2Os (one list per meta-training seed) as one list whose
    intervals and verdicts are over the L2Os: each L2O's statistic is first averaged over
    the meta-test seeds. A statistic that is the same for every L2O (a baseline's own
    numbers) keeps its interval over meta-test seeds. An L2O all of whose runs diverged
    adds to the count of what was left out."""
    if len(per_l2o) == 1:
        return per_l2o[0]
    out = []
    by_key = [{f.key: f for f in fs} for fs in per_l2o]
    for f0 in per_l2o[0]:
        fs = [d[f0.key] for d in by_key if f0.key in d]
        stats: dict = {}
        for label in f0.stats:
            runs = [f.stats.get(label, []) for f in fs]
            if all(len(r) == len(runs[0]) and np.array_equal(r, runs[0], equal_nan=True) for r in runs):
                stats[label] = runs[0]
                continue
            means = Paired()
            means.diverged = sum(getattr(f.stats.get(label), "diverged", 0) for f in fs)
            for r in runs:
                finite = [x for x in r if np.isfinite(x)]
                if finite:
                    means.append(float(np.mean(finite)))
                else:
                    means.diverged += 1
            stats[label] = means
        out.append(finding(
            f0.key, f0.claim, f"{f0.measure}; each of the {len(fs)} meta-trained L2Os averaged over "
            "the meta-test seeds first, the interval over L2Os", stats, f0.tests, f0.figure, f0.rule))
    return out
