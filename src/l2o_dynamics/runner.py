"""Meta-testing: run any optimizer on any optimizee for T steps over S seeds.

The S runs are one batched computation (a leading seed dimension on every
parameter and state tensor). Each seed has its own init and its own data order.
Probes record analyses (symmetry deviations, noise) at chosen steps; they see
the run's tensors but cannot change its trajectory: optimizers are pure and the
data order is owned by each run's own generator.

A run diverged when its minibatch loss at some step, or its final parameters, are
not finite (a non-finite update shows in the next step's loss or in the final
parameters). Each run's flag (1.0 diverged, 0.0 not) is logged as the metric
`diverged` at step T, with a warning, instead of leaving silent NaN rows.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_mod
from .hooks import Probe, StepContext
from .optimizees import Optimizee, Params, accuracy, cross_entropy, get_optimizee, stack_params
from .optimizers import Optimizer, make_baseline
from .results import MetricLog
from .env import cache_dir
from .errors import L2OError, Range
from .files import atomic_write_json
from .procs import check_interrupt
from .seeds import generator, lr_search_seeds, stable_hash

# The study's protocol for the baselines' learning rates (authors' scripts/meta_test.py:153-167,
# l2o/training.py:467-505): every rate of LR_GRID trained for half the meta-test horizon
# (1000 // 2 = STUDY_LR_HORIZON steps) in STUDY_LR_RUNS runs; the lowest summed training loss wins.
LR_GRID = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 3.0)
STEP_COUNT = Range(1, 10**12, integer=True)
STUDY_LR_HORIZON, STUDY_LR_RUNS = 500, 3
SEARCH_SEEDS = lr_search_seeds(2)  # search_lr's default runs: 10,000 and 10,001 (seeds.LR_SEARCH)


def init_params(model: Optimizee, seeds: Sequence[int], dtype=torch.float32, device=None) -> Params:
    """A stack of S parameter sets (S, ...), one per seed, each from its own generator."""
    return stack_params([model.init(generator("init", s), dtype=dtype, device=device) for s in seeds])


def meta_test(optimizer: Optimizer, model: Optimizee | str, train: tuple[torch.Tensor, torch.Tensor],
              seeds: Sequence[int], steps: int, *, batch_size: int = 128,
              eval_set: tuple[torch.Tensor, torch.Tensor] | None = None, eval_every: int = 10,
              probes: Sequence[Probe] = (), log: MetricLog | None = None,
              dtype=torch.float32, device=None, progress: bool = False, desc: str = "",
              warn_diverged: bool = True) -> MetricLog:
    """Train S optimizees (one per seed) with `optimizer` for `steps` steps.

    Logs, per seed: `train_loss`, `train_acc` of the minibatch at every step
    (before the update), `test_loss`, `test_acc` on `eval_set` at steps
    0, k, 2k, ... and after the last update (step = steps), and `diverged` (0 or 1)
    at step = steps, warned about unless `warn_diverged` is False (a learning-rate
    search diverges on purpose)."""
    model = get_optimizee(model)
    for name, value in (("steps", steps), ("eval_every", eval_every if eval_set is not None else 1)):
        if not STEP_COUNT.contains(value):
            raise L2OError(f"{name} must be a positive integer (at most {STEP_COUNT.hi:.0e}), got {value!r}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise L2OError(f"seeds must be a non-empty sequence of integers (one run each), got {seeds!r:.60}")
    device = torch.device(device or "cpu")
    log = log or MetricLog("meta-test", model.name, optimizer.name, seeds)
    params = init_params(model, seeds, dtype, device)
    train = tuple(t.to(device) for t in train)  # once, not once per run
    batchers = [data_mod.Batcher(*train, batch_size=batch_size, seed=s, device=device) for s in seeds]
    if eval_set is not None:
        ex = data_mod.to_float(eval_set[0].to(device)).to(dtype)
        ey = eval_set[1].to(device)
    with torch.no_grad():
        state = optimizer.init(params, batch_ndim=1)
        diverged = torch.zeros(len(seeds), dtype=torch.bool, device=device)  # (S,)
        for t in tqdm(range(steps), desc=desc or f"{optimizer.name} on {model.name}",
                      disable=not progress, leave=False):
            check_interrupt()
            x, y = data_mod.stack_batches(batchers)
            loss, grads, acc = model.loss_and_grad(params, x.to(dtype), y)
            log.add("train_loss", t, loss)
            diverged |= ~torch.isfinite(loss)
            log.add("train_acc", t, acc)
            if eval_set is not None and t % eval_every == 0:
                _evaluate(model, params, ex, ey, t, log)
            updates, new_state = optimizer.update(grads, state, params)
            if probes:
                ctx = StepContext(t, params, grads, updates, state, optimizer, model)
                for probe in probes:
                    if probe.due(t, steps):
                        for metric, values in probe.fn(ctx).items():
                            log.add(metric, t, values)
            params = {k: params[k] + updates[k] for k in params}
            state = new_state
        if eval_set is not None:
            _evaluate(model, params, ex, ey, steps, log)
        for v in params.values():  # (S, ...) -> (S,)
            diverged |= ~torch.isfinite(v.reshape(len(seeds), -1)).all(dim=1)
    log.add("diverged", steps, diverged.to(torch.float64))
    n = int(diverged.sum())
    if n and warn_diverged:
        warnings.warn(f"{n} of {len(seeds)} runs of {optimizer.name} on {model.name} diverged (non-finite loss "
                      "or parameters); flagged by the metric 'diverged'", stacklevel=2)
    return log


def _evaluate(model: Optimizee, params: Params, x: torch.Tensor, y: torch.Tensor, step: int,
              log: MetricLog, chunk: int = 5000) -> None:
    losses, accs, n = 0.0, 0.0, x.shape[0]
    for i in range(0, n, chunk):
        logits = model.logits(params, x[i:i + chunk])
        m = min(chunk, n - i)
        losses = losses + cross_entropy(logits, y[i:i + chunk]) * m
        accs = accs + accuracy(logits, y[i:i + chunk]) * m
    log.add("test_loss", step, losses / n)
    log.add("test_acc", step, accs / n)


# ---- learning-rate search -----------------------------------------------------------------
@dataclass
class LRSearch:
    optimizer: str
    optimizee: str
    horizon: int
    lr: float
    scores: dict[float, float]  # lr -> mean summed training loss (inf if it diverged)
    cached: bool = False
    seeds: tuple[int, ...] = ()  # one run per seed and rate

    def to_dict(self) -> dict:
        return {"optimizer": self.optimizer, "optimizee": self.optimizee, "horizon": self.horizon,
                "seeds": list(self.seeds), "lr": self.lr, "scores": {repr(k): v for k, v in self.scores.items()}}


def search_lr(name: str, model: Optimizee | str, data: "data_mod.MNIST", horizon: int, *,
              grid: Sequence[float] = LR_GRID, seeds: Sequence[int] = SEARCH_SEEDS,
              batch_size: int = 128, device=None, use_cache: bool = True,
              progress: bool = False) -> LRSearch:
    """Pick a baseline's learning rate from `grid` by the summed training loss of short
    runs (`horizon` steps, one per seed) trained on the validation split. All rates and
    seeds train at once as one batched computation. Cached per (optimizer, optimizee,
    horizon, grid, seeds, batch size). The study's protocol is `horizon=STUDY_LR_HORIZON`
    with `seeds=lr_search_seeds(STUDY_LR_RUNS)` (what the reproduce profiles use)."""
    model = get_optimizee(model)
    key = {"optimizer": name, "optimizee": model.name, "horizon": horizon, "grid": list(grid),
           "seeds": list(seeds), "batch_size": batch_size, "version": 1}
    path = cache_dir() / "lr_search" / f"{name}-{model.name}-{horizon}-{stable_hash(key)}.json"
    if use_cache and path.exists():
        cached = _read_lr_cache(path, grid)
        if cached is not None:
            return LRSearch(name, model.name, horizon, *cached, cached=True, seeds=tuple(seeds))
    rates = torch.tensor([lr for lr in grid for _ in seeds], dtype=torch.float32)
    run_seeds = [s for _ in grid for s in seeds]
    opt = make_baseline(name, lr=rates.to(device or "cpu"))
    log = meta_test(opt, model, data.split("val"), run_seeds, horizon, batch_size=batch_size,
                    device=device, progress=progress, desc=f"lr search {name} on {model.name}",
                    warn_diverged=False)
    totals = log.total("train_loss").reshape(len(grid), len(seeds))
    scores = {float(lr): (float(row.mean()) if np.all(np.isfinite(row)) else math.inf)
              for lr, row in zip(grid, totals)}
    best = min(scores, key=lambda lr: (scores[lr], lr))
    result = LRSearch(name, model.name, horizon, best, scores, seeds=tuple(seeds))
    if use_cache:
        try:
            atomic_write_json(path, {**key, **result.to_dict()})
        except OSError as e:
            warnings.warn(f"could not cache the learning-rate search in {path.parent} ({e.strerror or e}); "
                          "continuing without it", stacklevel=2)
    return result


def _read_lr_cache(path, grid: Sequence[float]) -> tuple[float, dict[float, float]] | None:
    """(lr, scores) of a cached search, or None (with a warning) when the file is
    unreadable or poisoned: lr not one of the grid's finite positive rates, or a
    score that is NaN or negative (inf marks a diverged rate)."""
    try:
        blob = json.loads(path.read_text())
        lr = blob["lr"]
        scores = {float(k): float(v) for k, v in blob["scores"].items()}
        ok = (isinstance(lr, (int, float)) and math.isfinite(lr) and lr in grid
              and all(v >= 0 for v in scores.values()))  # False for NaN
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        warnings.warn(f"ignoring the learning-rate cache {path}: unreadable or not a valid search result "
                      "(lr must be a finite rate of the grid); searching again", stacklevel=3)
        return None
    return float(lr), scores
