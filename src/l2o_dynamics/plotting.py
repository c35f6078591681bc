"""Figures, drawn only from tidy metrics files.

One colour per optimizer everywhere in the project; L2Os meta-trained with a
symmetry penalty get darker shades of the L2O colour as beta grows; the L2Os of a
further meta-training recipe (`l2o[authors]`) get a hue of their own. Curves are
the mean over seeds with a 95% t-interval band.
"""
from __future__ import annotations

import os
import textwrap
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from .results import PUBLISHED, Table, split_recipe  # noqa: E402
from .errors import L2OError  # noqa: E402
from .files import atomic_path  # noqa: E402

COLORS = {"sgd": "#1f77b4", "adam": "#ff7f0e", "lion": "#2ca02c", "l2o": "#d62728"}
ORDER = ("sgd", "adam", "lion", "l2o")
LABELS = {"sgd": "SGD", "adam": "Adam", "lion": "Lion", "l2o": "L2O"}


# runs that share a label, told apart by their directory: the tab20 colours not used above
RUN_COLORS = [c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if i not in (0, 2, 4, 6)]
BETA_STYLES = {0.1: ("#f4a582", "--"), 0.5: ("#a50f15", "-."), 1.0: ("#3f0008", ":")}
# L2Os of further recipes: (colour at beta 0, colour map of the penalised ones)
RECIPE_COLORS = {"authors": ("#6a3d9a", "Purples")}
OTHER_RECIPE = ("#8c564b", "copper_r")


def color(optimizer: str, beta: float | None = None) -> str | tuple:
    """The optimizer's colour; penalised L2Os (beta > 0) get lighter/darker reds, a further
    recipe's L2Os (`l2o[NAME]`) its own hue (RECIPE_COLORS)."""
    base = "l2o" if optimizer.startswith("l2o") else optimizer
    recipe = split_recipe(optimizer)[1]
    if recipe is not None:
        first, cmap = RECIPE_COLORS.get(recipe, OTHER_RECIPE)
        return matplotlib.colormaps[cmap](0.45 + 0.5 * min(beta, 1.0)) if beta else first
    if base == "l2o" and beta:
        return BETA_STYLES.get(round(beta, 3), (matplotlib.colormaps["Reds"](min(0.5 + 0.5 * beta, 1.0)),))[0]
    if base not in COLORS and base.endswith(")"):  # a run told apart by its directory (`read_runs`)
        return RUN_COLORS[zlib.crc32(base.encode()) % len(RUN_COLORS)]
    return COLORS.get(base, "#7f7f7f")


def _linestyle(optimizer: str, beta: float | None = None) -> str:
    if optimizer.startswith("l2o") and beta:
        return BETA_STYLES.get(round(beta, 3), (None, "--"))[1]
    return "-"


def label(optimizer: str, beta: float | None = None) -> str:
    """'L2O', 'L2O [authors] (β=0.5)', 'L2O(leaky_relu)'..."""
    name, recipe = split_recipe(optimizer)
    base = LABELS.get(name, name.replace("l2o", "L2O"))
    if recipe is not None:
        base = base.replace("L2O", f"L2O [{recipe}]", 1)
    return f"{base} (β={beta:g})" if beta is not None and optimizer.startswith("l2o") else base


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """values (T, S) -> mean (T,), half-width (T,) of the t-interval over seeds (0 if S = 1)."""
    values = np.asarray(values, dtype=float)
    n = np.sum(np.isfinite(values), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(values, axis=1)
        sd = np.nanstd(values, axis=1, ddof=1) if values.shape[1] > 1 else np.zeros(len(values))
        t = stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1))
        half = np.where(n > 1, t * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    return mean, np.nan_to_num(half)


def curve(ax, table: Table, optimizer: str, beta: float | None = None, *, log: bool = False,
          lw: float = 1.6, linestyle: str | None = None, label_text: str | None = None,
          marker: str | None = None) -> None:
    """Mean and 95% band over seeds of the one metric left in `table` (`marker` on each step)."""
    if not len(table):
        return
    steps, _, values = table.matrix()
    mean, half = mean_ci(values)
    c = color(optimizer, beta)
    lo, hi = mean - half, mean + half
    if log:
        lo = np.maximum(lo, mean / 3)  # a readable band on a log axis
    ax.plot(steps, mean, color=c, lw=lw, ls=linestyle or _linestyle(optimizer, beta), marker=marker, ms=3,
            label=label(optimizer, beta) if label_text is None else label_text)
    ax.fill_between(steps, lo, hi, color=c, alpha=0.18, lw=0)
    if log:
        ax.set_yscale("log")


def runs_in(table: Table) -> list[tuple[str, float | None]]:
    """(optimizer, beta) pairs present, in the project's order."""
    pairs = {(o, None if np.isnan(b) else float(b))
             for o, b in zip(table.cols["optimizer"], table.cols["beta"])}
    return sorted(pairs, key=lambda ob: (ORDER.index(ob[0]) if ob[0] in ORDER else 99, ob[1] or 0))


def save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(table: Table, path: str | os.PathLike, metrics: Sequence[str] = ("train_loss", "test_loss"),
                title: str | None = None) -> Path:
    """One panel per (optimizee, metric): every optimizer's curve, log scale."""
    optimizees = table.unique("optimizee")
    metrics = [m for m in metrics if len(table.where(metric=m))]
    if not optimizees or not metrics:
        raise L2OError("no train_loss/test_loss rows to plot; is this a meta-test results dir?")
    fig, axes = plt.subplots(len(metrics), len(optimizees), figsize=(5.2 * len(optimizees), 3.6 * len(metrics)),
                             squeeze=False)
    for j, name in enumerate(optimizees):
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            sub = table.where(optimizee=name, metric=metric)
            for opt, beta in runs_in(sub):
                curve(ax, sub.where(optimizer=opt, beta=beta), opt, beta, log=True)
            ax.set_title(f"{name}: {metric.replace('_', ' ')}")
            ax.set_xlabel("iteration")
            ax.set_ylabel(metric.replace("_", " ") + " (log)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def find_metrics(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise L2OError(f"{root} does not exist; give a results dir holding metrics.csv")
    if not root.is_dir():
        return [root]  # a file (results.Table.read refuses anything but a regular metrics.csv)
    files = sorted(root.rglob("metrics.csv"))
    if not files:
        raise L2OError(f"no metrics.csv under {root}; give a dir written by meta-test or reproduce")
    return files


def read_runs(root: str | os.PathLike) -> Table:
    """Every metrics.csv under `root` as one table. Runs of different files that share a
    label (experiment, optimizee, optimizer, beta, seed: two probes with default names,
    or two meta-tests of one optimizer at other settings) would plot as one curve with
    one of them hidden: their optimizer label gets the run's directory, relative to
    `root`, appended ('sgd (lr0.1)'), so each keeps a curve and a legend entry of its own."""
    files = find_metrics(root)
    tables = [Table.read(f) for f in files]
    keys = [set(zip(t.cols["experiment"], t.cols["optimizee"], t.cols["optimizer"],
                    map(str, t.cols["beta"].tolist()), t.cols["seed"].tolist())) for t in tables]
    base = Path(root) if Path(root).is_dir() else Path(root).parent
    for i, t in enumerate(tables):
        if any(keys[i] & keys[j] for j in range(len(tables)) if j != i):
            where = files[i].parent.relative_to(base).as_posix() if files[i].parent != base else files[i].parent.name
            t.cols["optimizer"] = np.asarray([f"{o} ({where})" for o in t.cols["optimizer"]], dtype=object)
    if len(tables) == 1:
        return tables[0]
    return Table({c: np.concatenate([t.cols[c] for t in tables]) for c in tables[0].cols})


def plot_dir(root: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """`l2o-dynamics plot DIR`: the loss curves of every run under DIR (`out`, default
    DIR/loss.png, when any run logged train_loss or test_loss) and, beside it, the
    deviation and noise figures of any probe output (`probe_figures`). Returns the paths."""
    table = read_runs(root)
    out = Path(out) if out else (Path(root) if Path(root).is_dir() else Path(root).parent) / "loss.png"
    losses = table.where(metric=["train_loss", "test_loss"])
    made = [loss_curves(losses, out)] if len(losses) else []
    made += probe_figures(table, out.parent, out.suffix or ".png")
    if not made:
        raise L2OError(f"nothing to plot under {root}: no train_loss/test_loss, deviation or noise rows; "
                       "give a dir written by meta-test, reproduce or a probe (probes.attach)")
    return made


def probe_figures(table: Table, out_dir: str | os.PathLike, suffix: str = ".png") -> list[Path]:
    """deviations{suffix}: each symmetry kind's relative deviation of the updates (solid)
    and, as the control, of the gradients (dotted); noise{suffix}: the tail index of
    update and gradient noise (the study's estimator) and the largest eigenvalue of the
    update covariance. One row per optimizee, one curve per optimizer; a figure is made
    only when its metrics are present."""
    made = []
    optimizees = table.unique("optimizee")
    for name, panels in (("deviations", _deviation_panels(table)), ("noise", _noise_panels(table))):
        if not panels:
            continue
        fig, axes = plt.subplots(len(optimizees), len(panels), figsize=(4.6 * len(panels), 3.2 * len(optimizees)),
                                 squeeze=False)
        for row, optimizee in zip(axes, optimizees):  # one row per model
            for ax, (title, metrics, log) in zip(row, panels):
                for opt, beta in runs_in(table):
                    for metric, role in metrics:
                        sub = table.where(optimizee=optimizee, optimizer=opt, beta=beta, metric=metric)
                        curve(ax, sub, opt, beta, log=log, linestyle="-" if role == "update" else ":",
                              label_text=f"{label(opt, beta)} {role}", marker="o" if name == "noise" else None)
                if not len(table.where(optimizee=optimizee, metric=[m for m, _ in metrics])):
                    ax.text(0.5, 0.5, "no such symmetry in this model", ha="center", transform=ax.transAxes)
                ax.set_title(f"{optimizee}: {title}", fontsize=9)
                ax.set_xlabel("step")
                ax.grid(alpha=0.3, which="both")
        legend_outside(fig, axes.ravel())
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        made.append(save(fig, Path(out_dir) / f"{name}{suffix}"))
    return made


def _deviation_panels(table: Table):
    present = set(table.unique("metric"))
    return [(f"{kind} deviation, relative", [(f"{kind}_deviation_rel", "update"),
                                              (f"grad_{kind}_deviation_rel", "gradient")], True)
            for kind in ("rescale", "scale", "translation") if f"{kind}_deviation_rel" in present]


def _noise_panels(table: Table):
    present = set(table.unique("metric"))
    panels = []
    if "alpha_update_pub" in present or "alpha_grad_pub" in present:
        panels.append(("noise tail index (study's estimator)", [("alpha_update_pub", "update"),
                                                                  ("alpha_grad_pub", "gradient")], False))
    if "cov_max_eig" in present:
        panels.append(("update covariance, largest eigenvalue", [("cov_max_eig", "update")], True))
    return panels


def legend_outside(fig, axes: Iterable) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center",
               ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, -0.02), frameon=False)


# ---- the study's figures ------------------------------------------------------------------------------
def _panel(ax, title: str, xlabel: str, ylabel: str, log: bool = False) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")


def symmetry_figure(table: Table, path, suffix: str = "") -> Path:
    """Figure 1: rescale deviation on leaky_relu (left), scale deviation on bn_relu (right)."""
    t = table.where(experiment="symmetry-breaking")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    what = {"": "deviation |sum_k c_k|", "_rel": "relative deviation (scale-free)",
            "_unit": "per-unit deviation sum_k |c_k|",
            PUBLISHED: "deviation as published\n(L2O: raw output = step / eta; SGD: -lr g)"}[suffix]
    for ax, (optimizee, kind) in zip(axes, (("leaky_relu", "rescale"), ("bn_relu", "scale"))):
        sub = t.where(optimizee=optimizee, metric=f"{kind}_deviation{suffix}")
        for opt, beta in runs_in(sub):
            curve(ax, sub.where(optimizer=opt), opt, beta, log=True)
        _panel(ax, f"{kind.capitalize()} symmetry breaking ({optimizee})", "iteration", what, log=True)
    legend_outside(fig, axes)
    what_of = ("the vectors the study's code measured as updates" if suffix == PUBLISHED
               else "each optimizer's updates")
    fig.suptitle(f"Deviation of {what_of} from the symmetry constraints (mean, 95% band over seeds)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, path)


def regularization_figure(table: Table, path) -> Path:
    """Figure 2: training loss of L2Os meta-trained with penalty weight beta, and baselines."""
    t = table.where(experiment="regularization", metric="train_loss")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (optimizee, kind) in zip(axes, (("leaky_relu", "rescale"), ("bn_relu", "scale"))):
        sub = t.where(optimizee=optimizee)
        for opt, beta in runs_in(sub):
            curve(ax, sub.where(optimizer=opt, beta=beta), opt, beta, log=True, lw=1.3)
        _panel(ax, f"{kind.capitalize()} symmetry breaking regularized ({optimizee})", "iteration",
               "training loss (log)", log=True)
    legend_outside(fig, axes)
    fig.suptitle("L2O meta-trained with a penalty beta * |deviation| next to the baselines", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save(fig, path)


def generalization_figure(table: Table, path) -> Path:
    """Mean training loss of each regularised L2O on optimizees it was not trained on."""
    t = table.where(experiment="generalization", metric="train_loss")
    sources = t.unique("optimizer")
    fig, axes = plt.subplots(1, max(len(sources), 1), figsize=(6 * max(len(sources), 1), 3.8), squeeze=False)
    for ax, src in zip(axes[0], sources):
        sub = t.where(optimizer=src)
        optimizees = sub.unique("optimizee")
        betas = [b for b in sub.unique("beta") if b is not None]
        width = 0.8 / max(len(betas), 1)
        for i, b in enumerate(betas):
            means, halves = [], []
            for o in optimizees:
                _, _, vals = sub.where(optimizee=o, beta=b).matrix()
                per = np.nanmean(vals, axis=0)
                m, h = mean_ci(per[None, :])
                means.append(m[0])
                halves.append(h[0])
            x = np.arange(len(optimizees)) + (i - (len(betas) - 1) / 2) * width
            ax.bar(x, means, width, yerr=halves, color=color(src, b), label=label(src.split("(")[0], b),
                   capsize=2)
        ax.set_xticks(np.arange(len(optimizees)), optimizees, rotation=20, fontsize=8)
        _panel(ax, f"{label(src)} on unseen optimizees", "", "mean training loss over the run")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def noise_figure(table: Table, path) -> Path:
    """Figure 3: tail index of update (solid) and gradient (dashed) noise, one panel per
    estimator and centring (noise.ESTIMATOR_LABELS: the study's estimator exact and as
    published side by side); largest eigenvalue of the update covariance (log), one point
    per checkpoint (step 0 included: the finding reads only the later ones)."""
    from .noise import ESTIMATOR_LABELS

    t = table.where(experiment="noise")
    present = set(t.unique("metric"))
    suffixes = [s for s in ESTIMATOR_LABELS if f"alpha_update{s}" in present] or [""]
    fig, axes = plt.subplots(1, len(suffixes) + 1, figsize=(5 * (len(suffixes) + 1), 4))
    for opt, beta in runs_in(t):
        sub = t.where(optimizer=opt)
        for ax, suffix in zip(axes, suffixes):
            curve(ax, sub.where(metric=f"alpha_update{suffix}"), opt, beta, label_text=f"{label(opt)} update")
            curve(ax, sub.where(metric=f"alpha_grad{suffix}"), opt, beta, linestyle="--",
                  label_text=f"{label(opt)} gradient")
        curve(axes[-1], sub.where(metric="cov_max_eig"), opt, beta, log=True, marker="o")
    for ax, suffix in zip(axes, suffixes):
        _panel(ax, "Noise tail index, leaky_relu\n" + textwrap.fill(ESTIMATOR_LABELS.get(suffix, suffix), 60),
               "iteration", "tail index alpha")
        ax.title.set_fontsize(8)
        ax.axhline(2.0, color="0.5", lw=0.8, ls=":")
    axes[0].legend(fontsize=7, ncol=2)
    _panel(axes[-1], "Update covariance per checkpoint, leaky_relu", "iteration", "largest eigenvalue (log)",
           log=True)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def meta_training_figure(table: Table, path) -> Path:
    """Meta-loss (running mean) and validation score of every meta-training."""
    t = table.where(experiment="meta-train")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = sorted({(opt, o, None if np.isnan(b) else float(b))
                   for opt, o, b in zip(t.cols["optimizer"], t.cols["optimizee"], t.cols["beta"])},
                  key=lambda r: (r[0], r[1], r[2] or 0))
    markers = {"leaky_relu": "o", "bn_relu": "s"}
    for opt, optimizee, beta in runs:
        sub = t.where(optimizer=opt, optimizee=optimizee, beta=beta)
        recipe = split_recipe(opt)[1]
        lab = f"{optimizee} β={beta or 0:g}" + (f" [{recipe}]" if recipe else "")
        ml = sub.where(metric="meta_loss")
        if len(ml):
            steps, _, vals = ml.matrix()
            v = vals[:, 0]
            k = max(1, len(v) // 25)
            smooth = np.convolve(v, np.ones(k) / k, mode="valid")
            axes[0].plot(steps[k - 1:], smooth, color=color(opt, beta), ls=_linestyle("l2o", beta),
                         marker=markers.get(optimizee, "o"), markevery=max(1, len(smooth) // 8), ms=4,
                         label=lab, lw=1.2)
        vs = sub.where(metric="val_score")
        if len(vs):
            steps, _, vals = vs.matrix()
            axes[1].plot(steps, vals[:, 0], marker=markers.get(optimizee, "o"), ms=4, color=color(opt, beta),
                         ls=_linestyle("l2o", beta), label=lab)
    _panel(axes[0], "Meta-training loss (running mean; o leaky_relu, □ bn_relu)", "meta-step (unroll)",
           "meta-loss log(sum of losses)")
    _panel(axes[1], "Validation score (lower is better; the best is kept)", "meta-step",
           "mean training loss of validation runs", log=True)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def study_overlay(table: Table, path) -> Path:
    """Our Fig. 1 and Fig. 3 (right) curves beside the study's values read off its figures
    (published.py, x markers): deviations as the study measured them (top row) and corrected
    (bottom row), and the covariance eigenvalue per checkpoint."""
    from .published import FIG1, FIG1_OPTIMIZEE, FIG3_COVARIANCE, fig1_as_step

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    sym = table.where(experiment="symmetry-breaking")
    for col, (kind, optimizee) in enumerate(FIG1_OPTIMIZEE.items()):
        for row, suffix in enumerate((PUBLISHED, "")):
            ax = axes[row, col]
            sub = sym.where(optimizee=optimizee, metric=f"{kind}_deviation{suffix}")
            for opt in sub.unique("optimizer"):
                run = sub.where(optimizer=opt)
                steps, _, vals = run.matrix()
                ax.plot(steps + 1, vals.mean(axis=1), color=color(opt), label=label(opt), lw=1.2)
            for opt in ORDER:
                points = FIG1.get((kind, opt), ())
                if row == 1:  # the study's L2O converted from its raw output to its step
                    points = fig1_as_step(points, opt)
                if points:
                    its, vs = zip(*points)
                    ax.plot(its, vs, "x", ms=9, mew=2, color=color(opt), label=f"study: {label(opt)}")
            what = "as the study measured (L2O raw output, SGD without momentum)" if row == 0 else \
                "corrected: each optimizer's real step (study's L2O / 10)"
            _panel(ax, f"{kind} ({optimizee})\n{what}", "iteration", "|total deviation|", log=True)
            ax.legend(fontsize=6, ncol=2)
    ax = axes[0, 2]
    cov = table.where(experiment="noise", metric="cov_max_eig")
    for opt in cov.unique("optimizer") if len(cov) else []:
        steps, _, vals = cov.where(optimizer=opt).matrix()
        ax.plot(steps + 1, vals.mean(axis=1), "o-", ms=3, color=color(opt), label=label(opt), lw=1.2)
    for opt, points in FIG3_COVARIANCE.items():
        its, vs = zip(*points)
        ax.plot(its, vs, "x", ms=9, mew=2, color=color(opt), label=f"study: {label(opt)}")
    _panel(ax, "update covariance, largest eigenvalue\n(leaky_relu, per checkpoint)", "iteration", "largest eigenvalue",
           log=True)
    ax.legend(fontsize=6, ncol=2)
    axes[1, 2].axis("off")
    axes[1, 2].text(0.02, 0.5, "x: the study's values read off its published figures\n(approximate, +-10%; "
                    "published.py). Lines: ours, mean over seeds.\nZeros (SGD as the study measured it) are "
                    "not drawn on the log axes.", fontsize=9, va="center")
    fig.tight_layout()
    return save(fig, path)


# ---- the meta-gradient estimators' diagnostic --------------------------------------------------------
ESTIMATOR_COLORS = {"tbptt": "#d62728", "es": "#1f77b4", "pes": "#2ca02c", "full-es": "#9467bd"}
PHI_STYLES = ("-", "--", ":", "-.")


def estimator_figure(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The diagnostic's figure, drawn from its JSON (`l2o-dynamics estimators`): against the
    truncation length K, the cosine of each estimate to the exact gradient on the same task
    (over all draws, and over the draws whose exact gradient float rounding does not turn), the
    estimate's per-coordinate variance, and the CPU seconds per estimate;
    one colour per estimator, one line style per phi (full-es: one point at K = T)."""
    import json

    try:
        result = json.loads(Path(path).read_text())
        phis, config = result["phis"], result["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise L2OError(f"{path} is not an estimator diagnostic's JSON ({type(e).__name__}); "
                       "give the estimators.json that `l2o-dynamics estimators` wrote") from None
    from .estimator_diagnostic import conditioned_cosine

    panels = (("cosine", "cosine to the exact gradient, all draws", False),
              ("conditioned", "cosine, well-conditioned draws", False),
              ("variance", "variance per coordinate (log)", True),
              ("cpu_seconds", "CPU seconds per estimate (log)", True))
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for (key, ylabel, log), ax in zip(panels, axes):
        for style, (name, ph) in zip(PHI_STYLES, phis.items()):
            for est, col in ESTIMATOR_COLORS.items():
                rows = sorted((r for r in ph["rows"] if r["estimator"] == est), key=lambda r: r["unroll"])
                if not rows:
                    continue
                ks = [r["unroll"] for r in rows]
                ys = [conditioned_cosine(r, ph["reference"]) if key == "conditioned" else r[key] for r in rows]
                ax.plot(ks, ys, style, color=col, marker="o", ms=4, label=f"{est} ({name})")
                if key == "cosine":
                    ax.errorbar(ks, ys, yerr=[1.96 * r["cosine_se"] for r in rows], fmt="none", ecolor=col,
                                alpha=0.6)
        _panel(ax, ylabel.split(" (")[0], "truncation length K (full-es: the whole run)", ylabel, log)
        ax.set_xscale("log")
        ticks = sorted({r["unroll"] for ph in phis.values() for r in ph["rows"]})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if key in ("cosine", "conditioned"):
            ax.axhline(0, color="#7f7f7f", lw=0.8)
            ax.set_ylim(-1.05, 1.05)
    fig.suptitle(f"meta-gradient estimators on {config['optimizee']}: T = {config['horizon']}, "
                 f"{config['draws']} draws, N = {config['pairs']} pairs, sigma = {config['sigma']:g}", fontsize=10)
    legend_outside(fig, axes)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save(fig, out)
