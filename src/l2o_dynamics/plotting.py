"""Figures, drawn only from tidy metrics files.

One colour per optimizer everywhere in the project; L2Os meta-trained with a
symmetry penalty get darker shades of the L2O colour as beta grows. Curves are
the mean over seeds with a 95% t-interval band.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from .results import Table  # noqa: E402
from .utils import L2OError, atomic_path  # noqa: E402

COLORS = {"sgd": "#1f77b4", "adam": "#ff7f0e", "lion": "#2ca02c", "l2o": "#d62728"}
ORDER = ("sgd", "adam", "lion", "l2o")
LABELS = {"sgd": "SGD", "adam": "Adam", "lion": "Lion", "l2o": "L2O"}


def color(optimizer: str, beta: float | None = None) -> str | tuple:
    if optimizer == "l2o" and beta:
        return matplotlib.colormaps["Reds"](min(0.55 + 0.4 * beta, 1.0)) if beta < 1 else "#67000d"
    return COLORS.get(optimizer, "#7f7f7f")


def label(optimizer: str, beta: float | None = None) -> str:
    base = LABELS.get(optimizer, optimizer)
    return f"{base} (β={beta:g})" if beta is not None and optimizer == "l2o" else base


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
          lw: float = 1.6, linestyle: str = "-", label_text: str | None = None) -> None:
    """Mean and 95% band over seeds of the one metric left in `table`."""
    if not len(table):
        return
    steps, _, values = table.matrix()
    mean, half = mean_ci(values)
    c = color(optimizer, beta)
    lo, hi = mean - half, mean + half
    if log:
        lo = np.where(lo > 0, lo, mean / 10)
    ax.plot(steps, mean, color=c, lw=lw, ls=linestyle,
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
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise L2OError(f"{root} does not exist; give a results dir holding metrics.csv")
    files = sorted(root.rglob("metrics.csv"))
    if not files:
        raise L2OError(f"no metrics.csv under {root}; give a dir written by meta-test or reproduce")
    return files


def plot_dir(root: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """`l2o-dynamics plot DIR`: loss curves of every meta-test under DIR."""
    files = find_metrics(root)
    table = Table.read(files)
    table = table.where(metric=["train_loss", "test_loss"])
    out = Path(out) if out else (Path(root) if Path(root).is_dir() else Path(root).parent) / "loss.png"
    return loss_curves(table, out)


def legend_outside(fig, axes: Iterable) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center",
               ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, -0.02), frameon=False)
