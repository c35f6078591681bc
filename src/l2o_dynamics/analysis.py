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
L2O, and each statistic that reads an L2O's runs becomes a (K, S) table, K L2Os by
S meta-test seeds (`across_l2os`). Its interval (`interval`, the K > 1 path) is a
two-level bootstrap: resample the meta-trainings, then the meta-test seeds, the same
resampled seeds for every L2O because a test seed is shared by all of them and by the
baselines (same init and data order). The bootstrap gives the standard error; the
interval is mean +- t * SE with Welch-Satterthwaite degrees of freedom between
K - 1 (meta-trainings dominate) and S - 1 (test seeds dominate):

    SE^2   = Var*( mean_k mean_s x[k*, s*] )         (rows k*, columns s* drawn with replacement)
    df     = (V_K + V_S)^2 / (V_K^2 / (K - 1) + V_S^2 / (S - 1)),
             V_K = var_k(row means) / K,  V_S = var_s(column means) / S

A plain percentile interval over 3 L2Os cannot reach past their range; on synthetic
(K=3, S=5) data it covered the mean 73% of the time where meta-trainings dominate,
and the t-interval over the L2O means alone covered 13% where the shared test-seed
effect does; this interval covered 91-100% in every regime tried
(tests/test_analysis.py checks its limits and coverage).

Recipes. The L2Os of further meta-training recipes (labelled `l2o[authors]`, ... beside
the main recipe's `l2o`) get findings of their own: `recipe_view` is the table with one
recipe's L2Os under the plain label and every baseline run, and `findings_by_recipe`
computes every finding on each view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from .results import PUBLISHED, Table, split_label, split_recipe

LEVEL = 0.95
BOOTSTRAP_REPS = 2000  # resamples of the two-level bootstrap (its SE to ~1.6%)
BOOTSTRAP_SEED = 0  # fixed: the same table gives the same interval


def interval(values) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% interval. values: (S,) per-seed values -> the t-interval
    over seeds (low = high = mean for 1 seed); (K, S) per-L2O rows over the same test seeds
    (NaN where missing) -> `two_level_interval`. Non-finite values are left out."""
    if np.ndim(values) == 2:
        return two_level_interval(np.asarray(values, dtype=float))
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def two_level_interval(x: np.ndarray, reps: int = BOOTSTRAP_REPS,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high) over a (K, S) table: row k an L2O (meta-training seed), column s a
    meta-test seed shared by every row; NaN (or +-inf) where missing. The mean is over the
    L2Os of each L2O's mean over its seeds; the interval is mean +- t_df * SE with SE from a
    two-level bootstrap (rows drawn with replacement, then columns, the same columns for
    every drawn row) and df by Welch-Satterthwaite from the two levels (module docstring).
    Deterministic: `seed` fixes the resamples. One usable row: its t-interval over seeds."""
    x = np.where(np.isfinite(x), x, np.nan)
    x = x[~np.all(np.isnan(x), axis=1)][:, ~np.all(np.isnan(x), axis=0)] if x.size else x  # (K', S')
    K = x.shape[0]
    if K == 0:
        return math.nan, math.nan, math.nan
    if K == 1:
        return interval(x[0].tolist())
    S = x.shape[1]
    row_means = np.nanmean(x, axis=1)  # (K,)
    m = float(row_means.mean())
    rng = np.random.default_rng(seed)
    # a resample as counts: row k drawn rows_n[b, k] times, column s cols_n[b, s] times; each
    # drawn row's mean over the drawn columns (its own missing cells left out), then their mean
    rows_n = _draw_counts(rng, reps, K)  # (B, K)
    cols_n = _draw_counts(rng, reps, S)  # (B, S)
    seen = ~np.isnan(x)  # (K, S)
    total = np.einsum("bs,ks->bk", cols_n, np.where(seen, x, 0.0))  # (B, K); einsum: no BLAS threads
    n = np.einsum("bs,ks->bk", cols_n, seen.astype(float))  # (B, K)
    rows_n = np.where(n > 0, rows_n, 0.0)  # a drawn row none of whose drawn columns it has: out
    weight = rows_n.sum(-1)  # (B,)
    rep = (rows_n * total / np.maximum(n, 1.0)).sum(-1)[weight > 0] / weight[weight > 0]  # (B',)
    se = float(rep.std(ddof=1)) if len(rep) > 1 else 0.0
    levels = [(float(np.var(row_means, ddof=1)) / K, K - 1)]
    if S > 1:
        col_means = np.nanmean(x, axis=0)  # (S,): every column has a value
        levels.append((float(np.var(col_means, ddof=1)) / S, S - 1))
    num = sum(v for v, _ in levels) ** 2
    den = sum(v * v / d for v, d in levels)
    if se == 0.0 or den == 0.0:
        return m, m, m
    half = float(stats.t.ppf(0.5 + LEVEL / 2, num / den) * se)
    return m, m - half, m + half


def _draw_counts(rng: np.random.Generator, reps: int, n: int) -> np.ndarray:
    """(reps, n): how often each of n units is drawn in each of `reps` resamples of n draws
    with replacement."""
    draws = rng.integers(0, n, (reps, n)) + n * np.arange(reps)[:, None]  # (reps, n), offset per resample
    return np.bincount(draws.ravel(), minlength=reps * n).reshape(reps, n).astype(float)


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
    stats: dict[str, list] = field(default_factory=dict)  # label -> the per-seed values (or OverL2Os) behind it
    tests: tuple[str, ...] = ()  # the labels in `stats` whose verdicts decide the finding
    rule: str = "all"  # how: "all" (the weakest test decides) or "most" (majority)


UNBOUNDED = ("alpha_",)  # metrics (prefixes) that may be +inf in a run that did not diverge


def per_seed(table: Table, reduce: Callable[[np.ndarray, np.ndarray], float] | None = None,
             steps: tuple[int, int] | None = None) -> dict[int, float]:
    """One number per seed from the one metric/run in `table`: the mean over `steps`
    [lo, hi] (inclusive) by default, or reduce(steps, values). A seed whose run has a
    NaN in the window (a run flagged diverged, see `mask_diverged`), or an infinite
    value of a metric that cannot be infinite (a loss, a deviation), diverged: it gets
    NaN, never a mean over what is left; `paired` and `verdict` then count it as unusable.
    A tail index (UNBOUNDED) is +inf when its block sums show no growth (tail.py): a
    value, not a divergence; its mean is then inf, which `paired` leaves out and counts
    apart from the diverged seeds."""
    if not len(table):
        return {}
    st, seeds, vals = table.matrix()
    unbounded = str(table.cols["metric"][0]).startswith(UNBOUNDED)
    if steps is not None:
        keep = (st >= steps[0]) & (st <= steps[1])
        st, vals = st[keep], vals[keep]
    out = {}
    for j, s in enumerate(seeds):
        col = vals[:, j]
        if np.any(np.isnan(col)) or not (unbounded or np.all(np.isfinite(col))):
            out[int(s)] = math.nan
        else:
            out[int(s)] = float(reduce(st, col) if reduce else col.mean())
    return out


class Paired(list):
    """Per-seed paired statistics (finite ones only), with `seeds`: the meta-test seed of
    each value; `diverged`: how many seeds were left out because a run of either side
    diverged (NaN); `infinite`: how many were left out for an infinite value that is not
    a divergence (a tail index of inf, see `per_seed`)."""

    diverged: int = 0
    infinite: int = 0
    seeds: tuple[int, ...] | None = None


def paired(a: dict[int, float], b: dict[int, float], transform=lambda x, y: x - y) -> Paired:
    out, seeds = Paired(), []
    for s in sorted(set(a) & set(b)):
        if np.isnan(a[s]) or np.isnan(b[s]):
            out.diverged += 1
            continue
        v = transform(a[s], b[s])
        if np.isfinite(v):
            out.append(v)
            seeds.append(s)
        else:
            out.infinite += 1
    out.seeds = tuple(seeds)
    return out


# Four levels for a claimed direction (> 0), from the 95% interval of the paired statistic:
VERDICTS = ("held", "weak", "inconclusive-opposite", "contradicted", "n/a")
MIN_SEEDS = 3  # fewer usable seeds: no verdict (an interval from 1-2 seeds says nothing)


def usable(values) -> int:
    """How many units a statistic rests on: finite per-seed values, or (K, S) rows (L2Os)
    with a finite value."""
    if np.ndim(values) == 2:
        return int(np.isfinite(np.asarray(values, dtype=float)).any(axis=1).sum())
    return sum(bool(np.isfinite(x)) for x in values)


def verdict(diffs) -> str:
    """held: mean > 0, interval excludes 0; weak: mean > 0, interval includes 0;
    inconclusive-opposite: mean <= 0, interval includes 0; contradicted: interval below 0;
    n/a: fewer than MIN_SEEDS usable values (per-seed values, or L2Os of a (K, S) table)."""
    if usable(diffs) < MIN_SEEDS:
        return "n/a"
    m, lo, hi = interval(diffs if np.ndim(diffs) == 2 else [x for x in diffs if np.isfinite(x)])
    if m > 0:
        return "held" if lo > 0 else "weak"
    return "contradicted" if hi < 0 else "inconclusive-opposite"


def diverged_note(*diffs: Sequence[float]) -> dict[str, str]:
    """{'seeds left out (a run diverged)': 'n'} when any paired statistic dropped seeds for
    a diverged run, and apart from it the seeds dropped for an infinite tail index; {} if none."""
    n = sum(getattr(d, "diverged", 0) for d in diffs)
    inf = sum(getattr(d, "infinite", 0) for d in diffs)
    return {**({"seeds left out (a run diverged)": str(n)} if n else {}),
            **({"seeds left out (alpha = inf: no tail growth; not a divergence)": str(inf)} if inf else {})}


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
                   {k: v if isinstance(v, (Paired, OverL2Os)) else list(v) for k, v in stats.items()
                    if not isinstance(v, str)},
                   tuple(tests), rule)


# ---- symmetry breaking ----------------------------------------------------------------------------------
SYM_PANELS = (("leaky_relu", "rescale"), ("bn_relu", "scale"))


def symmetry_findings(t: Table) -> list[Finding]:
    """Per panel of Figure 1 (rescale on leaky_relu, scale on bn_relu): L2O deviates more
    than SGD and Adam (studied and scale-free measures); L2O rises early, Lion later.
    Each on the corrected measurement (the real steps: `{kind}_deviation`), and the studied
    measure's findings again as published (`{kind}_deviation_published`: the L2O's raw
    network output, SGD without momentum; symmetry.published_update) where recorded."""
    t = t.where(experiment="symmetry-breaking")
    out = []
    for optimizee, kind in SYM_PANELS:
        panel = t.where(optimizee=optimizee)
        if not len(panel):
            continue
        published = len(panel.where(metric=f"{kind}_deviation{PUBLISHED}")) > 0
        out.append(_deviation_size(panel, optimizee, kind, ""))
        if published:
            out.append(_deviation_size(panel, optimizee, kind, PUBLISHED))
        out.append(_deviation_size(panel, optimizee, kind, "_rel"))
        out.append(_deviation_timing(panel, optimizee, kind, ""))
        if published:
            out.append(_deviation_timing(panel, optimizee, kind, PUBLISHED))
    return out


AS_PUBLISHED = ("(as published: the L2O's raw network output, 1/eta = 10x its step; SGD's -lr*g "
                "without its momentum) ")


def _deviation_size(panel: Table, optimizee: str, kind: str, suffix: str) -> Finding:
    """L2O vs SGD and Adam on `{kind}_deviation{suffix}` ('' total, '_rel', or PUBLISHED)."""
    metric = f"{kind}_deviation{suffix}"
    sub = panel.where(metric=metric)
    means = {o: per_seed(sub.where(optimizer=o)) for o in ("sgd", "adam", "lion", "l2o")}
    stats: dict = {o: list(m.values()) for o, m in means.items()}
    tests = [f"log10(L2O / {b})" for b in ("sgd", "adam")]
    stats.update({lbl: paired(means["l2o"], means[b], log_ratio) for lbl, b in zip(tests, ("sgd", "adam"))})
    claim = (f"{kind.capitalize()} symmetry ({optimizee}): the L2O's updates deviate from the "
             "geometric constraint much more than SGD's and Adam's.")
    name = {"": "total", "_rel": "rel", PUBLISHED: "total" + PUBLISHED}[suffix]
    if suffix == "_rel":
        claim = f"(companion) {kind.capitalize()} symmetry ({optimizee}), scale-free measure: the same."
    elif suffix == PUBLISHED:
        claim = AS_PUBLISHED + claim
    figure = {"": "symmetry_breaking.png", "_rel": "symmetry_breaking_rel.png",
              PUBLISHED: "symmetry_breaking_published.png"}[suffix]
    return finding(f"deviation_{kind}_{name}", claim,
                   f"mean over iterations of `{metric}` per seed; paired log10 ratio L2O / baseline",
                   stats, tests, figure)


def _deviation_timing(panel: Table, optimizee: str, kind: str, suffix: str) -> Finding:
    """L2O rises before Lion, Lion ends above the L2O, on `{kind}_deviation{suffix}`."""
    metric = f"{kind}_deviation{suffix}"
    sub = panel.where(metric=metric)
    T = int(sub.cols["step"].max())
    half = {o: per_seed(sub.where(optimizer=o), reduce=rise_time) for o in ("l2o", "lion")}
    end = {o: per_seed(sub.where(optimizer=o), steps=(int(0.9 * T), T)) for o in ("l2o", "lion")}
    stats = {"half-total iteration, L2O": list(half["l2o"].values()),
             "half-total iteration, Lion": list(half["lion"].values()),
             # > 0: the L2O reaches half its total sooner; Lion higher at the end
             "Lion minus L2O (iterations)": paired(half["lion"], half["l2o"]),
             "last 10%, log10(Lion / L2O)": paired(end["lion"], end["l2o"], log_ratio)}
    claim = (f"{kind.capitalize()} symmetry ({optimizee}): symmetry breaking rises fastest for the L2O at the "
             "beginning, while Lion's rises more gradually and ends higher.")
    return finding(
        f"deviation_{kind}_timing{suffix}", (AS_PUBLISHED if suffix else "") + claim,
        f"on `{metric}`, per seed: the iteration at which the cumulative deviation reaches half its total "
        "(L2O before Lion?) and the mean deviation over the last 10% of iterations (Lion above L2O?)",
        stats, ["Lion minus L2O (iterations)", "last 10%, log10(Lion / L2O)"],
        "symmetry_breaking_published.png" if suffix else "symmetry_breaking.png")


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
    out, used = Paired(), []
    for s in seeds:
        y = np.asarray([by_beta[b][s] for b in betas], dtype=float)
        if np.all(np.isfinite(y)) and np.ptp(x) > 0:
            out.append(float(np.polyfit(x, y, 1)[0]))
            used.append(s)
        else:
            out.diverged += 1
    out.seeds = tuple(used)
    return out


def majority(verdicts: Sequence[str]) -> str:
    """'Most of several comparisons': held if more than half are held; weak if more than
    half point the claimed way; contradicted if more than half are contradicted;
    inconclusive-opposite otherwise; n/a with fewer than MIN_SEEDS usable comparisons."""
    decided = [v for v in verdicts if v != "n/a"]
    if len(decided) < MIN_SEEDS:
        return "n/a"
    half = len(decided) / 2
    if sum(v == "held" for v in decided) > half:
        return "held"
    if sum(v in ("held", "weak") for v in decided) > half:
        return "weak"
    if sum(v == "contradicted" for v in decided) > half:
        return "contradicted"
    return "inconclusive-opposite"


def majority_summary(verdicts: Sequence[str]) -> str:
    counts = {lvl: sum(v == lvl for v in verdicts) for lvl in VERDICTS}
    return ", ".join(f"{n} {lvl}" for lvl, n in counts.items() if n) or "no comparisons"


RULES = {"all": _combine, "most": majority}  # Finding.rule -> how its tests' verdicts combine


# ---- noise -------------------------------------------------------------------------------------------
def noise_findings(t: Table) -> list[Finding]:
    """Figure 3's claims, once per tail estimator (noise.ESTIMATOR_LABELS) that was
    recorded: the study's estimator on the exact centring (`_pub`), then the same as
    published (`_pub_published`: float32 centring), then the other estimators; and the
    update covariance over the checkpoints after step 0 (step 0 shown apart)."""
    t = t.where(experiment="noise", optimizee="leaky_relu")
    out = []
    if not len(t):
        return out
    opts = [o for o in ("sgd", "adam", "lion", "l2o") if o in t.unique("optimizer")]
    if "l2o" not in opts:
        return out
    from .noise import ESTIMATOR_LABELS

    recorded = set(t.unique("metric"))
    base = [o for o in ("sgd", "adam") if o in opts]
    for suffix, name in ESTIMATOR_LABELS.items():
        if f"alpha_update{suffix}" not in recorded:
            continue
        out += _alpha_findings(t, opts, base, suffix, name)
    out.append(_covariance_finding(t, opts, base))
    return out


def _alpha_findings(t: Table, opts: list[str], base: list[str], suffix: str, name: str) -> list[Finding]:
    au = {o: per_seed(t.where(optimizer=o, metric=f"alpha_update{suffix}")) for o in opts}
    ag = {o: per_seed(t.where(optimizer=o, metric=f"alpha_grad{suffix}")) for o in opts}
    tests = [f"L2O minus {o}" for o in base]
    out = [finding(
        f"alpha_update_vs_baselines{suffix}",
        "The noise in the L2O's updates is less heavy-tailed (larger alpha) than the updates of "
        f"SGD and Adam. [{name}]",
        f"mean over checkpoints of alpha_update{suffix} per seed; paired L2O minus baseline",
        {**{f"alpha_update {o}": list(au[o].values()) for o in opts},
         **{lbl: paired(au["l2o"], au[o]) for lbl, o in zip(tests, base)}}, tests, "noise.png")]
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
    return out


def _covariance_finding(t: Table, opts: list[str], base: list[str]) -> Finding:
    """cov_max_eig, L2O vs SGD and Adam, over the checkpoints after step 0 only: at step 0
    Adam's and Lion's first, sign-like steps dominate and would swamp the mean."""
    cov = t.where(metric="cov_max_eig")
    last = int(cov.cols["step"].max()) if len(cov) else 0
    eig = {o: per_seed(cov.where(optimizer=o), steps=(1, last)) for o in opts}
    first = {o: per_seed(cov.where(optimizer=o), steps=(0, 0)) for o in opts}
    tests = [f"log10(L2O / {o})" for o in base]
    return finding(
        "cov_max_eig",
        "The L2O's updates vary more across minibatches: a larger largest eigenvalue of the update "
        "covariance than SGD and Adam.",
        "mean over the checkpoints after step 0 of cov_max_eig per seed (step 0 shown apart, never "
        "averaged in); paired log10 ratio L2O / baseline; the curves per checkpoint are in the figure",
        {**{f"cov_max_eig {o}, after step 0": list(eig[o].values()) for o in opts},
         **{f"cov_max_eig {o}, step 0": list(first[o].values()) for o in opts},
         **{lbl: paired(eig["l2o"], eig[o], log_ratio) for lbl, o in zip(tests, base)}}, tests, "noise.png")


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
    several meta-training seeds, intervals over the L2Os (the statistics that read no L2O
    run found on the table with every L2O run masked)."""
    t = recipe_view(t, recipe)
    views = l2o_views(mask_diverged(t))
    per_l2o = [findings_of_one(v) for v in views]
    without = findings_of_one(without_l2os(views[0])) if len(views) > 1 else []
    return trend_over_beta(across_l2os(per_l2o, without), t)


# ---- findings that need a trend over beta ---------------------------------------------------------
TREND_OVER_BETA = {"regularization_slowdown": "regularization", "regularization_unseen": "generalization"}
SINGLE_L2O = "single L2O per beta"


def meta_trainings_per_beta(t: Table, experiment: str) -> tuple[int, int]:
    """(fewest, most) meta-trained L2Os at one (L2O, optimizee, beta) of `experiment`'s
    training-loss runs; (0, 0) if it has none."""
    sub = t.where(experiment=experiment, metric="train_loss")
    if not len(sub):
        return 0, 0
    first = (sub.cols["step"] == sub.cols["step"].min()) & (sub.cols["seed"] == sub.cols["seed"].min())
    sub = Table({c: a[first] for c, a in sub.cols.items()})  # one row per run
    names, ks = _split_labels(sub)
    per: dict[tuple[str, str, str], set[int]] = {}
    for name, optimizee, beta, k in zip(names, sub.cols["optimizee"], sub.cols["beta"], ks):
        if str(name).startswith("l2o"):
            per.setdefault((str(name), str(optimizee), repr(float(beta))), set()).add(int(k))
    counts = [len(v) for v in per.values()]
    return (min(counts), max(counts)) if counts else (0, 0)


def trend_over_beta(findings: list[Finding], t: Table) -> list[Finding]:
    """A trend over beta with one meta-training per beta is the trend of those L2Os, not of
    the recipe: its text says 'single L2O per beta' (the verdict stands, over test seeds).
    With more than one per beta but fewer than MIN_SEEDS at some beta: n/a."""
    out = []
    for f in findings:
        experiment = TREND_OVER_BETA.get(f.key)
        fewest, most = meta_trainings_per_beta(t, experiment) if experiment else (0, 0)
        if most == 1:
            f = replace(f, claim=f"{f.claim} [{SINGLE_L2O}]",
                        measure=f"{f.measure}; {SINGLE_L2O}: one meta-training at each beta, so the interval "
                                "covers meta-test seeds only and the trend is that of these L2Os, not shown "
                                "to be the recipe's")
        elif most > 1 and fewest < MIN_SEEDS:
            f = replace(f, verdict="n/a", values={
                **f.values, "meta-trainings per beta": f"{fewest} to {most}: fewer than {MIN_SEEDS} at some "
                                                       "beta, no verdict on a trend"})
        out.append(f)
    return out


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


def without_l2os(t: Table) -> Table:
    """`t` with every value of every L2O run (a label `l2o...`, any meta-training seed) NaN:
    a statistic that still has a value on it reads no L2O run; it is a baseline's own."""
    names, _ = _split_labels(t)
    hit = np.char.startswith(names.astype(str), "l2o")
    return Table({**t.cols, "value": np.where(hit, math.nan, t.cols["value"])})


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
    seed of its own: curves and summary tables over all L2Os (never paired statistics).
    Descriptive only: intervals on it treat the K x S runs as independent, so they leave
    out that runs of one L2O, and runs on one test seed, are alike (the report says so)."""
    if meta_seeds(t) == 1:
        return t
    names, ks = _split_labels(t)
    return Table({**t.cols, "optimizer": names, "seed": t.cols["seed"] + SEED_STRIDE * ks})


class OverL2Os(list):
    """One statistic of K meta-trained L2Os as a (K, S) table, a list of K rows: row k the
    values of one L2O, column s one meta-test seed (NaN where that L2O has none). `interval`
    and `verdict` read it by the two-level bootstrap (`two_level_interval`). `diverged` and
    `infinite` count what was left out, as in `Paired`, plus each L2O left out whole."""

    diverged: int = 0
    infinite: int = 0

    def means(self) -> list[float]:
        """Each L2O's mean over its seeds (K,)."""
        return [float(np.nanmean(r)) for r in self]


def over_l2os(runs: Sequence[Sequence[float]]) -> OverL2Os:
    """The (K, S) table of one statistic from its K per-L2O value lists: a `Paired` is
    aligned by its `seeds`, any other list by position (`per_seed` gives one value per
    seed of the table, NaN included). An L2O with no finite value is left out and counted."""
    keyed = [dict(zip(r.seeds, r)) if getattr(r, "seeds", None) is not None else dict(enumerate(r)) for r in runs]
    cols = sorted(set().union(*keyed))
    out = OverL2Os()
    out.diverged = sum(getattr(r, "diverged", 0) for r in runs)
    out.infinite = sum(getattr(r, "infinite", 0) for r in runs)
    for r, by_col in zip(runs, keyed):
        row = np.asarray([by_col.get(c, math.nan) for c in cols], dtype=float)  # (S,)
        if np.isfinite(row).any():
            out.append(row.tolist())
        elif (getattr(r, "infinite", 0) and not getattr(r, "diverged", 0)) or (len(row) and not np.isnan(row).any()):
            out.infinite += 1  # only infinite tail indices
        else:
            out.diverged += 1
    return out


def across_l2os(per_l2o: list[list[Finding]], without_l2o: Sequence[Finding] = ()) -> list[Finding]:
    """Findings of K meta-trained L2Os (one list per meta-training seed) as one list whose
    intervals and verdicts are over the L2Os and their test seeds: each statistic that
    reads an L2O's runs becomes an `OverL2Os` table (its interval the two-level bootstrap).
    Which statistics read no L2O run is decided by label, not by value: `without_l2o` holds
    the same findings computed with every run of an `l2o...` label masked (`without_l2os`);
    a statistic that still has a value there is a baseline's own and keeps its interval
    over meta-test seeds. (Deciding by equal values across L2Os took an L2O statistic that
    coincides across L2Os, e.g. integer rise times, for a baseline's.) An L2O all of whose
    runs diverged adds to the count of what was left out."""
    if len(per_l2o) == 1:
        return per_l2o[0]
    baseline = {f.key: {label for label, v in f.stats.items() if not np.all(np.isnan(np.asarray(v, dtype=float)))}
                for f in without_l2o}
    out = []
    by_key = [{f.key: f for f in fs} for fs in per_l2o]
    for f0 in per_l2o[0]:
        fs = [d[f0.key] for d in by_key if f0.key in d]
        stats: dict = {}
        for label in f0.stats:
            if label in baseline.get(f0.key, ()):
                stats[label] = f0.stats[label]
            else:
                stats[label] = over_l2os([f.stats.get(label, []) for f in fs])
        out.append(finding(
            f0.key, f0.claim, f"{f0.measure}; over the {len(fs)} meta-trained L2Os and the meta-test seeds "
            "(two-level bootstrap: meta-trainings, then test seeds)", stats, f0.tests, f0.figure, f0.rule))
    return out
