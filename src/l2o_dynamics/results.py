"""Tidy results: one long CSV per run plus a config.json beside it.

Columns: experiment, optimizee, optimizer, beta, seed, step, metric, value
(beta is empty where it does not apply). Figures and reports are made only from
these files. Every write is atomic: an interrupted run leaves nothing that looks
complete.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .utils import L2OError, atomic_write_json, atomic_write_text, entries, environment

COLUMNS = ("experiment", "optimizee", "optimizer", "beta", "seed", "step", "metric", "value")
Row = tuple  # (experiment, optimizee, optimizer, beta, seed, step, metric, value)
# Several meta-trained L2Os per setting: the one of meta-training seed k > 0 is labelled
# `l2o@mk` (`l2o(leaky_relu)@mk`); seed 0 keeps the plain label.
META_SEED_MARK = "@m"
# L2Os of a further meta-training recipe beside the main one (experiments.Profile.extra_recipes)
# carry its name in brackets: `l2o[authors]`, `l2o[authors](leaky_relu)@m1`; the main recipe's
# keep the plain label.


def l2o_label(name: str, meta_seed: int = 0, recipe: str | None = None) -> str:
    if recipe:
        name = f"l2o[{recipe}]{name[3:]}" if name.startswith("l2o") else name
    return f"{name}{META_SEED_MARK}{meta_seed}" if meta_seed else name


def split_label(optimizer: str) -> tuple[str, int]:
    """'l2o@m2' -> ('l2o', 2); any other label -> (label, 0)."""
    name, mark, k = optimizer.rpartition(META_SEED_MARK)
    return (name, int(k)) if mark and k.isdigit() else (optimizer, 0)


def split_recipe(optimizer: str) -> tuple[str, str | None]:
    """'l2o[authors](leaky_relu)@m1' -> ('l2o(leaky_relu)@m1', 'authors'); a label without a
    recipe mark -> (label, None)."""
    if optimizer.startswith("l2o["):
        recipe, bracket, rest = optimizer[4:].partition("]")
        if bracket and recipe:
            return "l2o" + rest, recipe
    return optimizer, None


class MetricLog:
    """Collects rows of one run: `add(metric, step, values)` with one value per seed."""

    def __init__(self, experiment: str, optimizee: str, optimizer: str,
                 seeds: Sequence[int], beta: float | None = None) -> None:
        self.experiment, self.optimizee, self.optimizer = experiment, optimizee, optimizer
        self.beta = "" if beta is None else beta
        self.seeds = list(seeds)
        self.entries: list[tuple[str, int, Any]] = []  # (metric, step, values): checkpointable

    def add(self, metric: str, step: int, values: Any) -> None:
        """values: a scalar (same for all seeds) or a sequence / (S,) tensor per seed."""
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", torch.float64).reshape(-1).numpy()
        self.entries.append((metric, int(step), values))

    def total(self, metric: str) -> np.ndarray:
        """Per seed, the sum over steps of `metric` (S,)."""
        out = np.zeros(len(self.seeds))
        for m, _, values in self.entries:
            if m == metric:
                out += np.asarray(values, dtype=np.float64)
        return out

    def curve(self, metric: str) -> np.ndarray:
        """`metric` over its logged steps, in order, per seed: (T, S)."""
        return np.array([np.broadcast_to(np.asarray(v, dtype=np.float64), (len(self.seeds),))
                         for m, _, v in self.entries if m == metric]).reshape(-1, len(self.seeds))

    def rows(self) -> list[Row]:
        out = []
        head = (self.experiment, self.optimizee, self.optimizer, self.beta)
        for metric, step, values in self.entries:
            if np.ndim(values) == 0:
                values = [float(values)] * len(self.seeds)
            for seed, v in zip(self.seeds, values, strict=True):
                out.append((*head, seed, step, metric, float(v)))
        return out


def format_rows(rows: Iterable[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow((*r[:7], repr(float(r[7]))))
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Iterable[Row]) -> None:
    atomic_write_text(path, format_rows(rows))


def write_run(out_dir: str | os.PathLike, config: dict, rows: Iterable[Row],
              device: Any = None, started: float | None = None) -> Path:
    """metrics.csv, then config.json (resolved config, versions, seed, git commit)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", rows)
    cfg = dict(config)
    cfg["environment"] = environment(device)
    if started is not None:
        cfg["wall_time_s"] = round(time.time() - started, 3)
    atomic_write_json(out / "config.json", cfg)
    return out


def prepare_out_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check `--out` before any work: an existing non-empty dir needs `overwrite`,
    and the dir must be writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise L2OError(f"--out {out} exists and is not a directory; give a new or empty directory")
    if out.is_dir() and entries(out) and not overwrite:
        raise L2OError(f"--out {out} exists and is not empty; pass --overwrite or choose a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise L2OError(f"--out {out} is not writable ({e.strerror}); choose a writable directory") from None
    return out


# ---- reading ------------------------------------------------------------------------
@dataclass
class Table:
    """Columns of a long-format metrics CSV as numpy arrays."""

    cols: dict[str, np.ndarray]

    @classmethod
    def read(cls, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> "Table":
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        data: dict[str, list] = {c: [] for c in COLUMNS}
        for p in paths:
            with open(p, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None or tuple(header) != COLUMNS:
                    raise L2OError(f"{p} is not an l2o-dynamics metrics.csv (header {header})")
                for row in reader:
                    for c, v in zip(COLUMNS, row):
                        data[c].append(v)
        return cls.from_lists(data)

    @classmethod
    def from_rows(cls, rows: Iterable[Row]) -> "Table":
        data: dict[str, list] = {c: [] for c in COLUMNS}
        for r in rows:
            for c, v in zip(COLUMNS, r):
                data[c].append(v)
        return cls.from_lists(data)

    @classmethod
    def from_lists(cls, data: dict[str, list]) -> "Table":
        cols = {c: np.asarray([str(v) for v in data[c]], dtype=object)
                for c in ("experiment", "optimizee", "optimizer", "metric")}
        cols["beta"] = np.asarray([float(v) if v not in ("", None) else math.nan for v in data["beta"]])
        cols["seed"] = np.asarray(data["seed"], dtype=np.int64)
        cols["step"] = np.asarray(data["step"], dtype=np.int64)
        cols["value"] = np.asarray(data["value"], dtype=np.float64)
        return cls(cols)

    def __len__(self) -> int:
        return len(self.cols["value"])

    def where(self, **eq: Any) -> "Table":
        """Rows whose columns equal the given values (beta=None selects empty beta)."""
        mask = np.ones(len(self), dtype=bool)
        for c, v in eq.items():
            col = self.cols[c]
            if c == "beta":
                mask &= np.isnan(col) if v is None else np.isclose(col, float(v))
            elif isinstance(v, (list, tuple, set)):
                mask &= np.isin(col, list(v))
            else:
                mask &= col == v
        return Table({c: a[mask] for c, a in self.cols.items()})

    def unique(self, col: str) -> list:
        vals = self.cols[col]
        if col == "beta":
            return sorted({None if math.isnan(v) else float(v) for v in vals},
                          key=lambda v: -1 if v is None else v)
        return sorted(set(vals.tolist()))

    def matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For one metric of one run: (steps (T,), seeds (S,), values (T, S)) with NaN holes."""
        steps = np.unique(self.cols["step"])
        seeds = np.unique(self.cols["seed"])
        out = np.full((len(steps), len(seeds)), np.nan)
        out[np.searchsorted(steps, self.cols["step"]), np.searchsorted(seeds, self.cols["seed"])] = \
            self.cols["value"]
        return steps, seeds, out
