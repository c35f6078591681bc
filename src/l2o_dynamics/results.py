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
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .env import environment
from .errors import L2OError
from .files import atomic_write_json, atomic_write_text, drop_replaced, fresh_path, run_dir

COLUMNS = ("experiment", "optimizee", "optimizer", "beta", "seed", "step", "metric", "value")
Row = tuple  # (experiment, optimizee, optimizer, beta, seed, step, metric, value)
# Several meta-trained L2Os per setting: the one of meta-training seed k > 0 is labelled
# `l2o@mk` (`l2o(leaky_relu)@mk`); seed 0 keeps the plain label.
META_SEED_MARK = "@m"
# A metric named NAME + PUBLISHED is NAME measured as the study's code computed it (for
# example the L2O's raw network output instead of its step, or float32 centring): it
# exists to explain the study's numbers; NAME, the corrected measurement, is the default.
PUBLISHED = "_published"
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
    """metrics.csv, then config.json (resolved config, versions, seed, git commit); then the
    old contents that `--overwrite` moved aside are deleted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", rows)
    cfg = dict(config)
    cfg["environment"] = environment(device)
    if started is not None:
        cfg["wall_time_s"] = round(time.time() - started, 3)
    atomic_write_json(out / "config.json", cfg)
    drop_replaced(out)  # finished: the old contents --overwrite moved aside go now
    return out


def save_run(out_dir: str | os.PathLike, config: dict, rows: list[Row], *, device: Any = None,
             started: float | None = None, write: Callable[..., Path] | None = None,
             rescue_dir: str | os.PathLike | None = None) -> Path:
    """`write` (default `write_run`) into `out_dir`; when that fails with an OSError (a full
    disk, a vanished mount) the computed rows are not lost: they are written to a new
    directory `l2o-dynamics-rescued-*` under `rescue_dir` (default the system's temporary
    directory, often another file system) and an L2OError says what failed and where the
    results are, or that they could not be saved anywhere."""
    write = write or write_run
    try:
        return write(out_dir, config, rows, device=device, started=started)
    except OSError as e:
        failed = f"writing the results to {e.filename or out_dir} failed ({e.strerror or e})"
    rescue = None
    try:
        rescue = fresh_path(rescue_dir or tempfile.gettempdir(), "l2o-dynamics-rescued-", directory=True)
        write(rescue, config, rows, device=device, started=started)
    except OSError as e:
        if rescue is not None:
            shutil.rmtree(rescue, ignore_errors=True)  # the directory this call just created
        raise L2OError(f"{failed}; the computed results could not be saved elsewhere either "
                       f"({e.strerror or e}); free some space and run again") from None
    raise L2OError(f"{failed}; the computed results are saved in {rescue} instead: move them to {out_dir}")


def prepare_out_dir(path: str | os.PathLike, overwrite: bool = False, kind: str = "probe",
                    flag: str = "--out") -> Path:
    """Check and claim `--out` before any work (files.run_dir's rules: a new or empty
    directory, or with `overwrite` one the tool made, whose contents are moved aside until
    `write_run` finishes there); it must be writable. `flag` names the directory in errors:
    '--out' (a command line: hints say --overwrite) or a Python argument such as 'out'
    (hints say overwrite=True)."""
    try:
        with run_dir(path, kind, overwrite=overwrite, flag=flag):
            os.unlink(fresh_path(path, ".l2o-write-test-"))  # a fresh name: never an existing file
    except OSError as e:
        raise L2OError(f"{flag} {path} is not writable ({e.strerror}); choose a writable directory") from None
    return Path(path)


# ---- reading ------------------------------------------------------------------------
@dataclass
class Table:
    """Columns of a long-format metrics CSV as numpy arrays."""

    cols: dict[str, np.ndarray]

    @classmethod
    def read(cls, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> "Table":
        """The rows of one or more metrics.csv files; L2OError (one line, naming the file and
        line) for anything that is not one: not a regular file (a directory, FIFO or device
        is never opened for reading), over MAX_CSV_BYTES, not UTF-8, NUL bytes, a wrong
        header, a row without 8 fields, a seed or step that is not an integer in
        0..MAX_STEP, a beta or value that is not a number."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        tables = []
        for p in paths:
            data: dict[str, list] = {c: [] for c in COLUMNS}
            try:
                rows = csv.reader(io.StringIO(_read_text(p), newline=""))
                header = next(rows, None)
                if header is None or tuple(header) != COLUMNS:
                    raise L2OError(f"{p} is not an l2o-dynamics metrics.csv (header {header!r:.100}; expected "
                                   f"{','.join(COLUMNS)})")
                for row in rows:
                    if len(row) != len(COLUMNS):
                        raise L2OError(f"{p}: line {rows.line_num} has {len(row)} fields, expected {len(COLUMNS)} "
                                       f"({','.join(COLUMNS)})")
                    for c, v in zip(COLUMNS, row):
                        data[c].append(v)
                tables.append(cls.from_lists(data))
            except L2OError:
                raise
            except csv.Error as e:
                raise L2OError(f"{p} is not an l2o-dynamics metrics.csv ({e})") from None
            except (ValueError, OverflowError) as e:
                raise L2OError(f"{p} is not an l2o-dynamics metrics.csv: {e}") from None
        if len(tables) == 1:
            return tables[0]
        if not tables:
            return cls.from_lists({c: [] for c in COLUMNS})
        return cls({c: np.concatenate([t.cols[c] for t in tables]) for c in tables[0].cols})

    @classmethod
    def from_rows(cls, rows: Iterable[Row]) -> "Table":
        data: dict[str, list] = {c: [] for c in COLUMNS}
        for r in rows:
            for c, v in zip(COLUMNS, r):
                data[c].append(v)
        return cls.from_lists(data)

    @classmethod
    def from_lists(cls, data: dict[str, list]) -> "Table":
        """ValueError naming the column and the first bad entry when a seed or step is not
        an integer in 0..MAX_STEP or a beta or value is not a number."""
        cols = {c: np.asarray([str(v) for v in data[c]], dtype=object)
                for c in ("experiment", "optimizee", "optimizer", "metric")}
        cols["beta"] = _column(data["beta"], "beta", lambda v: float(v) if v not in ("", None) else math.nan)
        cols["seed"] = _column(data["seed"], "seed", _count, np.int64)
        cols["step"] = _column(data["step"], "step", _count, np.int64)
        cols["value"] = _column(data["value"], "value", float)
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


MAX_CSV_BYTES = 4 * 2**30  # a paper-profile run's metrics.csv is a few hundred MB
MAX_STEP = 2**62


def _read_text(path: str | os.PathLike, limit: int | None = None) -> str:
    """A regular file's text of at most `limit` bytes (default MAX_CSV_BYTES), opened
    without blocking (a FIFO is refused, not waited on)."""
    limit = MAX_CSV_BYTES if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise L2OError(f"cannot read {path} ({e.strerror}); give a metrics.csv written by l2o-dynamics") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise L2OError(f"{path} is not a regular file; give a metrics.csv written by l2o-dynamics")
        if st.st_size > limit:
            raise L2OError(f"{path} is {st.st_size:,} bytes, more than any metrics.csv ({limit:,}); refused")
        with os.fdopen(os.dup(fd), "rb") as f:
            blob = f.read(limit + 1)
        if len(blob) > limit:  # grew while being read
            raise L2OError(f"{path} grew past {limit:,} bytes while being read; refused")
    except OSError as e:
        raise L2OError(f"cannot read {path} ({e.strerror}); give a metrics.csv written by l2o-dynamics") from None
    finally:
        os.close(fd)
    if b"\0" in blob:
        raise L2OError(f"{path} holds NUL bytes; not an l2o-dynamics metrics.csv")
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise L2OError(f"{path} is not UTF-8 text (byte {e.start}); not an l2o-dynamics metrics.csv") from None


def _count(v) -> int:
    """A seed or step: an integer in 0..MAX_STEP (a string such as '3', or an int)."""
    n = int(v)
    if isinstance(v, float) or not 0 <= n <= MAX_STEP:
        raise ValueError(v)
    return n


def _column(values: list, name: str, parse, dtype=np.float64) -> np.ndarray:
    """`values` as a numpy column (vectorised when every entry converts; otherwise parsed
    one by one to name the first bad entry in a ValueError)."""
    if parse is float:
        try:
            return np.asarray(values, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            pass
    elif parse is _count:
        try:
            out = np.asarray(values, dtype=np.int64)
            if out.size == 0 or (out.min() >= 0 and out.max() <= MAX_STEP):
                return out
        except (ValueError, TypeError, OverflowError):
            pass
    out = np.empty(len(values), dtype=dtype)
    for i, v in enumerate(values):
        try:
            out[i] = parse(v)
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"row {i + 1}: {name} {v!r:.40} is not "
                             f"{'a non-negative integer' if dtype is np.int64 else 'a number'}") from None
    return out
