"""Meta-training the L2O by truncated backpropagation through time.

Either family of learned optimizers (`MetaTrainConfig.family`): the coordinate-wise LSTM of
learned.py (lstm, the default) or the per-parameter MLP of mlp_lopt.py (mlp); both have the
functional init/update interface, so everything below serves both (M_phi is either).

One optimizee run: `horizon` steps from a fresh init and a fresh data order,
cut into unrolls of K steps. For one unroll starting at theta_s (detached):

    dtheta_t = M_phi(g_t; h_t)       theta_{t+1} = theta_t + dtheta_t
    L_{t+1}  = loss(theta_{t+1}; batch_{t+1})           t = s .. s+K-1
    meta-loss = log(sum_t L_t)   (or sum, or mean of log)
              + beta * sum_t |deviation(dtheta_t; theta_t.detach())|

The optimizee gradients g_t are detached inputs (first order). Each L_t enters the
graph through the surrogate  L_t + <g_t, theta_t - stopgrad(theta_t)>, whose value
is L_t and whose gradient in theta_t is g_t: the optimizee network is evaluated once
per step, without a graph, and the meta-backward walks only the LSTM and the theta
chain, so an unroll costs O(K). At a truncation theta and the LSTM states are
detached and the run continues.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import symmetry
from .learned import (L2O, NET_RANGES, adopt_fusion, check_phi, fusion_in_use, init_phi, l2o_from_checkpoint,
                      read_torch)
from .mlp_lopt import MLP_RANGES, MLPL2O, check_mlp_phi, init_mlp_phi, mlp_net, mlp_phi_shapes
from .optimizees import Optimizee, get_optimizee
from .optimizers import Float32Range, tree_tensors
from .results import MetricLog, write_run
from .runner import init_params, meta_test
from .env import resolve_device
from .errors import L2OError, Range
from .files import atomic_torch_save
from .procs import check_interrupt
from .seeds import VALIDATION, derive_seed, generator

META_LOSSES = ("logsum", "sum", "meanlog")
LOSS_INDICES = ("next", "current")
# val: held-out runs on the validation split; train-runs: fresh runs on the training split (the
# authors' n_tests=3 path, training.py:318-358); meta-loss: the epoch's mean meta-training loss
# (their n_tests=0 path: mean over the epoch's runs of the summed training losses, each taken
# before its update; here the mean per step, the same order)
SELECTIONS = ("val", "train-runs", "meta-loss")
OUT_BIAS = ("default", "zero")
SCHEDULES = ("constant", "cosine", "step")
REGS = ("rescale", "scale", "translation", "all")
FAMILIES = ("lstm", "mlp")  # learned.L2O, mlp_lopt.MLPL2O
# The network settings of each family; a config of one family must leave the other's at their defaults.
FAMILY_FIELDS = {"lstm": ("hidden", "layers", "p", "eta", "log_eps", "out_bias"),
                 "mlp": ("mlp_hidden", "mlp_layers", "step_mult", "exp_mult")}
# A collapse: for COLLAPSE_UNROLLS consecutive unrolls the updates drift (|mean u| / mean |u|
# above cfg.collapse: every coordinate moves the same way, whatever its gradient) while the
# optimizee dies (a DEAD share of its hidden units flat, or its loss at CHANCE x log(classes)).
# Drift alone is no sign: an untrained L2O drifts (~0.5-1.0) and still trains.
COLLAPSE_UNROLLS = 3
DEAD, CHANCE = 0.5, 0.9
VAL_SEEDS = VALIDATION.start  # validation runs use seeds VAL_SEEDS + i, never a training seed (seeds.py)
EARLY_STEPS = 25  # the "fast start": mean loss over steps 1..25


@dataclass
class MetaTrainConfig:
    optimizee: str = "leaky_relu"  # a zoo name, or a comma-separated mixture
    family: str = "lstm"  # the learned optimizer: lstm (learned.L2O) or mlp (mlp_lopt.MLPL2O)
    epochs: int = 50
    runs: int = 20  # optimizee runs per epoch
    horizon: int = 200
    unroll: int = 20
    batch_size: int = 128
    tasks: int = 1  # optimizee runs meta-trained together (meta-loss averaged)
    meta_lr: float = 1e-3
    lr_schedule: str = "constant"
    meta_loss: str = "logsum"
    clip_grad: float | None = None  # max global norm of the meta-gradient
    reg: str | None = None  # symmetry penalty: rescale | scale | translation | all
    beta: float = 0.0
    reg_measure: str = "total"  # total | rel
    val_runs: int = 3
    rollback: float | None = None  # restore the best phi when val > rollback x best
    rollback_cut: float = 0.5  # meta-lr factor applied at every rollback (published: halve for good)
    loss_index: str = "next"  # next: L(theta_{s+1})..L(theta_{s+K}); current: L(theta_s)..L(theta_{s+K-1})
    out_bias: str = "default"  # init of the output bias: default U(+-1/sqrt(H)), or zero
    curriculum: tuple[int, ...] | None = None  # run horizons, one stage per equal share of epochs
    # (a stage of horizon h runs runs * horizon / h runs per epoch: every epoch has as many meta-steps)
    short_runs: float = 0.0  # share of runs cut to their first unroll (steps 1..K get more weight)
    collapse: float | None = None  # drift above this while the optimizee dies: roll back (see _one_run)
    init_from: str | None = None  # start from a trained L2O (l2o.pt path or pretrained:NAME)
    seed: int = 0
    hidden: int = 20
    layers: int = 2
    p: float = 10.0
    eta: float = 0.1
    log_eps: float = 0.0  # added inside the log of the gradient preprocessing (authors: 1e-8)
    # the MLP family's network (mlp_lopt.py): hidden width and layers, output scales (the reference's)
    mlp_hidden: int = 32
    mlp_layers: int = 2
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    select: str = "val"  # keep the epoch with the best: val | train-runs | meta-loss (SELECTIONS)
    # the meta-gradient estimator (estimators.py): tbptt | es | pes | full-es; the ES family's settings
    estimator: str = "tbptt"
    pairs: int = 8  # antithetic pairs N per task
    sigma: float = 0.01  # std of the perturbations of phi
    horizon_min: int | None = None  # es/pes/full-es: run lengths log-uniform in [horizon_min, horizon]
    offsets: bool = True  # es/pes: each epoch's first runs start at a random multiple of unroll
    full_es_loss: str = "mean"  # full-es: mean of the run's losses, or the last one
    sign: bool = False  # full-es: the sign of the antithetic loss difference (VeLO)
    device: str = "cpu"
    dtype: str = "float32"

    def validate(self) -> "MetaTrainConfig":
        names = [n.strip() for n in self.optimizee.split(",")] if isinstance(self.optimizee, str) else []
        if not names or not all(names):
            raise L2OError(f"optimizee {self.optimizee!r} is not a zoo name or a comma-separated list of them "
                           f"(e.g. leaky_relu or leaky_relu,sigmoid)")
        models = self.models()
        for name, valid in RANGES.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                valid.check(name, value)
        self._validate_family()
        if self.unroll > self.horizon:
            raise L2OError(f"unroll ({self.unroll}) must be at most horizon ({self.horizon})")
        if self.horizon % self.unroll:
            raise L2OError(f"horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})")
        steps = self.epochs * self.runs * (self.horizon // self.unroll)
        if steps > MAX_META_STEPS:
            raise L2OError(f"epochs x runs x horizon / unroll = {steps:,} meta-steps; valid: at most {MAX_META_STEPS:,}")
        if self.meta_loss not in META_LOSSES:
            raise L2OError(f"unknown meta-loss {self.meta_loss!r}; valid: {', '.join(META_LOSSES)}")
        if self.lr_schedule not in SCHEDULES:
            raise L2OError(f"unknown meta-lr schedule {self.lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.loss_index not in LOSS_INDICES:
            raise L2OError(f"unknown loss index {self.loss_index!r}; valid: {', '.join(LOSS_INDICES)}")
        if self.select not in SELECTIONS:
            raise L2OError(f"unknown selection {self.select!r}; valid: {', '.join(SELECTIONS)}")
        if self.select == "meta-loss" and self.rollback is not None:
            raise L2OError("rollback compares per-epoch evaluation runs; it needs select 'val' or 'train-runs'")
        if self.out_bias not in OUT_BIAS:
            raise L2OError(f"unknown output-bias init {self.out_bias!r}; valid: {', '.join(OUT_BIAS)}")
        if self.curriculum is not None:
            self.curriculum = tuple(RANGES["horizon"].check("curriculum horizon", h) for h in self.curriculum)
            bad = [h for h in self.curriculum if h <= 0 or h % self.unroll or h > self.horizon]
            if not self.curriculum or bad:
                raise L2OError(f"curriculum horizons must be positive multiples of unroll ({self.unroll}) "
                               f"and at most horizon ({self.horizon}), got {list(self.curriculum)}")
        if self.init_from is not None:  # a missing, malformed or mismatched one fails here, before any work
            start = l2o_from_checkpoint(self.init_from)
            family = "mlp" if isinstance(start, MLPL2O) else "lstm"
            if family != self.family:
                raise L2OError(f"init_from {self.init_from} is an L2O of the {family} family; this config's family "
                               f"is {self.family}: make them equal (CLI: --family {family})")
            if family == "lstm" and (start.hidden, start.layers) != (self.hidden, self.layers):
                raise L2OError(f"init_from {self.init_from} has hidden {start.hidden}, layers {start.layers}; "
                               f"this config has hidden {self.hidden}, layers {self.layers}: make them equal")
            if family == "mlp" and (start.hidden, start.hidden_layers) != (self.mlp_hidden, self.mlp_layers):
                raise L2OError(f"init_from {self.init_from} has {start.hidden_layers} hidden layers of "
                               f"{start.hidden}; this config has mlp_layers {self.mlp_layers}, mlp_hidden "
                               f"{self.mlp_hidden}: make them equal")
        if self.dtype not in ("float32", "float64"):
            raise L2OError(f"unknown dtype {self.dtype!r}; valid: float32, float64")
        if self.reg is not None:
            if self.reg not in REGS:
                raise L2OError(f"unknown reg {self.reg!r}; valid: {', '.join(REGS)}")
            if self.reg_measure not in ("total", "rel"):
                raise L2OError(f"unknown reg_measure {self.reg_measure!r}; valid: total, rel")
            for m in models:
                if self.reg != "all" and self.reg not in symmetry.applicable(m.structure):
                    raise L2OError(f"optimizee {m.name} has no {self.reg} symmetry; valid reg for it: "
                                   f"{', '.join(symmetry.applicable(m.structure))}, all")
        elif self.beta:
            raise L2OError(f"beta={self.beta:g} needs reg (rescale, scale, translation or all)")
        self._validate_estimator()
        check_fits(self, available_memory(resolve_device(self.device)))
        return self

    def _validate_family(self) -> None:
        if self.family not in FAMILIES:
            raise L2OError(f"unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        other = next(f for f in FAMILIES if f != self.family)
        defaults = {f.name: f.default for f in fields(self)}
        given = [k for k in FAMILY_FIELDS[other] if getattr(self, k) != defaults[k]]
        if given:
            raise L2OError(f"{', '.join(given)} apply to the {other} family only, not to family {self.family}; "
                           f"the {self.family} family's network settings are "
                           f"{', '.join(FAMILY_FIELDS[self.family])}")

    def _validate_estimator(self) -> None:
        from .estimators import ESTIMATORS, FULL_ES_LOSSES

        if self.estimator not in ESTIMATORS:
            raise L2OError(f"unknown estimator {self.estimator!r}; valid: {', '.join(ESTIMATORS)}")
        if self.full_es_loss not in FULL_ES_LOSSES:
            raise L2OError(f"unknown full_es_loss {self.full_es_loss!r}; valid: {', '.join(FULL_ES_LOSSES)}")
        for name in ("offsets", "sign"):
            if not isinstance(getattr(self, name), bool):
                raise L2OError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.horizon_min is not None:
            low = 1 if self.estimator == "full-es" else self.unroll
            if not low <= self.horizon_min <= self.horizon:
                raise L2OError(f"horizon_min ({self.horizon_min}) must be in {low}..horizon ({self.horizon})"
                               + ("" if low == 1 else " (at least unroll)"))
        if self.estimator == "tbptt":
            return
        given = [name for name, on in (("short_runs", self.short_runs > 0), ("curriculum", self.curriculum),
                                        ("collapse", self.collapse is not None)) if on]
        if given:
            raise L2OError(f"estimator {self.estimator} does not support {', '.join(given)} (tbptt only; the "
                           "default recipe sets short_runs and collapse): use recipe plain or authors")

    def run_horizon(self, epoch: int, run: int = 0) -> int:
        """Length of run `run` of `epoch`: one unroll for the `short_runs` share of runs
        (spread evenly), else the curriculum stage's horizon, or `horizon`."""
        if run >= 0 and math.floor((run + 1) * self.short_runs) > math.floor(run * self.short_runs):
            return self.unroll
        if self.curriculum is None:
            return self.horizon
        return self.curriculum[min(epoch * len(self.curriculum) // self.epochs, len(self.curriculum) - 1)]

    def epoch_runs(self, epoch: int) -> int:
        """Runs in `epoch`: `runs`, times horizon / h in a curriculum stage of horizon h."""
        if self.curriculum is None:
            return self.runs
        return self.runs * self.horizon // self.run_horizon(epoch, -1)

    def total_meta_steps(self) -> int:
        if self.estimator != "tbptt":
            from .estimators import meta_steps_per_epoch
            return self.epochs * meta_steps_per_epoch(self)
        return sum(self.run_horizon(e, r) // self.unroll for e in range(self.epochs)
                   for r in range(self.epoch_runs(e)))

    def models(self) -> list[Optimizee]:
        return [get_optimizee(n.strip()) for n in self.optimizee.split(",") if n.strip()]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["curriculum"] is not None:
            d["curriculum"] = list(d["curriculum"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MetaTrainConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if d.get("curriculum") is not None:
            d["curriculum"] = tuple(d["curriculum"])
        return cls(**d)


# Valid values of the numeric fields (the CLI parses its options with the same ranges).
_COUNT = Range(1, 1_000_000, integer=True)
RANGES: dict[str, Range] = {
    "epochs": _COUNT, "runs": _COUNT, "horizon": _COUNT, "unroll": _COUNT, "val_runs": Range(1, 10_000, integer=True),
    # validation runs draw minibatches from the validation split (MNIST.val_size images)
    "batch_size": Range(1, data_mod.MNIST.val_size, integer=True), "tasks": Range(1, 10_000, integer=True),
    **NET_RANGES, "seed": Range(0, 2**63 - 1, integer=True),
    "mlp_hidden": MLP_RANGES["hidden"], "mlp_layers": MLP_RANGES["hidden_layers"],
    "step_mult": MLP_RANGES["step_mult"], "exp_mult": MLP_RANGES["exp_mult"],
    "pairs": Range(1, 100_000, integer=True), "sigma": Range(1e-8, 100),
    "horizon_min": _COUNT,
    # values that multiply float32 tensors must not underflow (optimizers.Float32Range)
    "meta_lr": Float32Range(0, 1, lo_open=True), "clip_grad": Float32Range(0, 1e6, lo_open=True),
    "beta": Float32Range(0, 1e6), "rollback": Range(1, 1e6, lo_open=True),
    "rollback_cut": Float32Range(0, 1, lo_open=True),
    "short_runs": Range(0, 1, hi_open=True), "log_eps": Float32Range(0, 1),
    "collapse": Range(0, 1, lo_open=True, hi_open=True),
}
OPTIONAL = ("clip_grad", "rollback", "collapse", "horizon_min")
MAX_META_STEPS = 10_000_000  # the published recipe takes 10,000


# ---- memory ----------------------------------------------------------------------------
def memory_estimate(cfg: MetaTrainConfig) -> dict[str, int]:
    """Bytes meta-training `cfg` holds at its peak, by part (a lower bound: the terms that
    grow with the settings; Python and torch's own overhead come on top).

    With n the largest optimizee's parameter count, B = tasks, R = B n LSTM rows, K the
    unroll, H hidden, L layers, I_l the input width of layer l (2, then H), s the dtype's
    bytes and P the meta-parameter count (`phi_shapes`):

        meta_params = 7 P s      phi, its gradient, Adam's two moments, best phi, best Adam state
        population  = (ES family, no graph) s ((2N+1) R (2 L H + 6H + 4) + (2N+2) B P): every copy's
                      LSTM states, one step's gates, parameters and gradients; the perturbations
        unroll      = (tbptt) K s (R sum_l (I_l + 9H) + sum_l 4H (I_l + H) + 8 B n)
                      per step and layer the graph keeps [x, h] (R, I_l + H), c, tanh c' (R, H),
                      the gate activations (R, 4H), the new h, c (R, H) and the gate-scaled
                      weights (4H, I_l + H); per step B n-vectors of parameters, gradients, updates
        data        = N_TRAIN x 784 bytes of MNIST training images + 2 B batch_size 784 s of minibatches

    The MLP family (F = 28 normalised features, H = mlp_hidden, L = mlp_layers, P its phi) keeps
    per coordinate instead: unroll, per step, the features and the pieces they are built from
    (2F), each layer's activations before and after the ReLU (2 L H) and the two outputs; a
    population copy its accumulators (4), one step's features and pieces (2F) and activations (2H):

        population  = s ((2N+1) R (2F + 2H + 4) + (2N+2) B P)
        unroll      = K s (R (2F + 2 L H + 2) + 8 B n)"""
    from .learned import phi_shapes
    from .mlp_lopt import N_NORMALISED

    s = torch.finfo(cfg.torch_dtype).bits // 8
    n = max(sum(math.prod(shape) for shape in m.shapes().values()) for m in cfg.models())
    big_b, h, k = cfg.tasks, cfg.hidden, cfg.unroll
    rows = big_b * n
    if cfg.family == "mlp":
        f, h = N_NORMALISED, cfg.mlp_hidden
        n_phi = sum(math.prod(shape) for shape in mlp_phi_shapes(h, cfg.mlp_layers).values())
        per_step = rows * (2 * f + 2 * cfg.mlp_layers * h + 2) + 8 * big_b * n
        per_copy = 2 * f + 2 * h + 4
    else:
        inputs = [2] + [h] * (cfg.layers - 1)
        n_phi = sum(math.prod(shape) for shape in phi_shapes(h, cfg.layers).values())
        per_step = rows * sum(i + 9 * h for i in inputs) + sum(4 * h * (i + h) for i in inputs) + 8 * big_b * n
        per_copy = 2 * cfg.layers * h + 4 * h + 2 * h + 4
    if cfg.estimator != "tbptt":  # no graph: C = 2N + 1 copies of the B runs' states, one step's gates
        copies = (2 * cfg.pairs + 1) * rows
        population = copies * per_copy + (2 * cfg.pairs + 2) * n_phi * big_b
        return {"meta_params": 7 * n_phi * s, "population": population * s,
                "data": data_mod.N_TRAIN * data_mod.DIM + 2 * big_b * cfg.batch_size * data_mod.DIM * s}
    return {"meta_params": 7 * n_phi * s, "unroll": k * per_step * s,
            "data": data_mod.N_TRAIN * data_mod.DIM + 2 * big_b * cfg.batch_size * data_mod.DIM * s}


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on `device`: CUDA's free memory; on the CPU Linux's
    MemAvailable (capped by a cgroup v2 limit less the cgroup's non-cache use), else the
    free physical pages; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:  # a container's limit, less what its processes hold (page cache is reclaimable)
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            found.append(int(limit) - int((cgroup / "memory.current").read_text()) + int(stat.get("file", 0)))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return max(min(found), 0)


def check_fits(cfg: MetaTrainConfig, available: int | None) -> None:
    """L2OError, before anything is allocated, when `memory_estimate(cfg)` exceeds
    `available` bytes (None: unknown, not checked)."""
    need = memory_estimate(cfg)
    total = sum(need.values())
    if available is not None and total > available:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items())
        raise L2OError(f"meta-training this config needs at least {_gib(total)} ({parts}) but {cfg.device} has "
                       f"{_gib(available)} available; lower hidden, layers, unroll or tasks")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


# ---- recipes ---------------------------------------------------------------------------
# A recipe is a set of MetaTrainConfig fields over the dataclass defaults. 'authors' is the
# study's recipe as its code runs it; 'plain' the dataclass defaults, bit for bit what this
# project ran before recipes existed; 'default' is what docs/meta_training.md measured to
# train a fast starter reliably on a 2-core CPU.
_DEFAULT = dict(short_runs=0.9, clip_grad=1.0, rollback=1.5, rollback_cut=1.0, collapse=0.9)
RECIPES: dict[str, dict] = {
    # The study's authors' recipe as their code runs it (docs/replication.md lists each setting
    # with its file and line): meta-loss over the losses before each update, +1e-8 inside the
    # preprocessing log, 50 x 20 x 10 = 10,000 meta-steps, meta-Adam 1e-3, no clipping, no
    # rollback or collapse monitor, the epoch whose 3 fresh runs on the training split have the
    # lowest summed training loss kept (main.ipynb n_tests=3; training.py:318-358).
    "authors": dict(loss_index="current", log_eps=1e-8, select="train-runs"),
    # BACKGROUND.md sec. 2 as first read (the paper's formulas; selection on held-out runs).
    "plain": {},
    "default": _DEFAULT,
    # The per-parameter MLP learned optimizer (mlp_lopt.py, the reference's step_mult 1e-3) with
    # the default recipe's meta-training at the shipped LSTMs' budget (8 x 50 runs: 760
    # meta-steps), chosen among four candidates on selection seeds by optimizee loss
    # (docs/mlp_l2o.md); the family `reproduce --l2o-family lstm,mlp` analyses beside the LSTM.
    "mlp": dict(_DEFAULT, family="mlp", epochs=8, runs=50),
}


RECIPE_ALIASES = {"published": "authors"}  # 'published' named 'plain' before the authors' code was read


def recipe(name: str = "default", **overrides) -> MetaTrainConfig:
    """The MetaTrainConfig of recipe `name` with `overrides` (any config field) applied. A
    recipe's network settings of the other family are left out (`--recipe authors --family
    mlp` takes the authors' meta-training without their LSTM preprocessing's log_eps)."""
    name = RECIPE_ALIASES.get(name, name)
    if name not in RECIPES:
        raise L2OError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    family = overrides.get("family", RECIPES[name].get("family", "lstm"))
    other = [k for f, keys in FAMILY_FIELDS.items() if f != family for k in keys]
    return MetaTrainConfig(**{**{k: v for k, v in RECIPES[name].items() if k not in other}, **overrides})


# ---- one unroll ------------------------------------------------------------------------
@dataclass
class Unroll:
    meta_loss: torch.Tensor  # (B,) per task, with graph to phi (penalty included)
    reg: torch.Tensor  # (B,) sum over steps of the deviation (before beta), with graph
    losses: torch.Tensor  # (K, B) minibatch losses after each update (values)
    params: dict
    state: dict
    grads: dict  # gradient at the last params, input of the next unroll
    drift: torch.Tensor  # (K, B) |mean_i u_i| / mean_i |u_i| of each step's update (value)


def unroll(l2o: L2O | MLPL2O, model: Optimizee, params: dict, state: dict, grads: dict,
           next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int, *,
           meta_loss: str = "logsum", reg: str | None = None, beta: float = 0.0,
           reg_measure: str = "total", loss_index: str = "next",
           loss0: torch.Tensor | None = None) -> Unroll:
    """Run K = `steps` L2O updates from (params, state) whose current gradient is `grads`
    (all detached), building the graph from phi to the meta-loss.

    loss_index 'next' sums L(theta_{s+1}) .. L(theta_{s+K}); 'current' (the authors')
    sums L(theta_s) .. L(theta_{s+K-1}), with L(theta_s) = `loss0` (B,), a constant."""
    first = next(iter(params))
    batch_ndim = params[first].ndim - len(model.shapes()[first])
    dtype = params[first].dtype
    surrogate, values, drift = [], [], []
    penalty = 0.0
    for _ in range(steps):
        updates, state = l2o.update(grads, state, params)
        with torch.no_grad():
            flat = torch.cat([u.detach().flatten(batch_ndim) for u in updates.values()], dim=-1)
            drift.append(flat.mean(-1).abs() / flat.abs().mean(-1).clamp_min(torch.finfo(dtype).tiny))
        if reg is not None and beta:
            theta = {k: v.detach() for k, v in params.items()}
            penalty = penalty + symmetry.deviation(reg, updates, theta, model.structure, reg_measure)
        params = {k: params[k] + updates[k] for k in params}
        x, y = next_batch()
        loss, grads, _ = model.loss_and_grad(params, x.to(dtype), y)
        link = sum((grads[k] * (params[k] - params[k].detach())).flatten(batch_ndim).sum(-1)
                   for k in params)
        surrogate.append(loss + link)
        values.append(loss)
    if loss_index == "current":  # L(theta_s) (no path to phi) in, the last step's loss out
        if loss0 is None:
            raise ValueError("loss_index='current' needs loss0, the loss at the unroll's start")
        surrogate = [loss0.detach(), *surrogate[:-1]]
    stacked = torch.stack(surrogate)
    if meta_loss == "logsum":
        total = stacked.sum(0).log()
    elif meta_loss == "sum":
        total = stacked.sum(0)
    else:
        total = stacked.log().mean(0)
    reg_term = penalty if isinstance(penalty, torch.Tensor) else torch.zeros_like(total)
    return Unroll(total + beta * reg_term, reg_term, torch.stack(values), params, state, grads,
                  torch.stack(drift))


# ---- schedules ----------------------------------------------------------------------------
def meta_lr(cfg: MetaTrainConfig, step: int, total: int, scale: float = 1.0) -> float:
    """The schedule's meta-learning rate at meta-step `step` of `total`, times `scale`
    (halved at every rollback)."""
    frac = min(step / max(total, 1), 1.0)
    if cfg.lr_schedule == "cosine":
        return scale * cfg.meta_lr * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.lr_schedule == "step":
        return scale * cfg.meta_lr * (0.1 ** (int(frac >= 0.5) + int(frac >= 0.75)))
    return scale * cfg.meta_lr


# ---- validation --------------------------------------------------------------------------
def validation_score(l2o: L2O | MLPL2O, cfg: MetaTrainConfig, data: data_mod.MNIST) -> float:
    """Mean minibatch training loss over the full horizon of `val_runs` runs (held-out
    seeds) trained on the validation split (on the training split with select='train-runs',
    as the authors did), averaged over the optimizees. Lower is better."""
    return validation_scores(l2o, cfg, data)["val_score"]


def validation_scores(l2o: L2O | MLPL2O, cfg: MetaTrainConfig, data: data_mod.MNIST) -> dict[str, float]:
    """`val_score` (see `validation_score`) and `val_early`: the same runs' mean loss
    over steps 1..EARLY_STEPS (the fast start), each averaged over the optimizees."""
    seeds = [VAL_SEEDS + i for i in range(cfg.val_runs)]
    device = resolve_device(cfg.device)
    scores, early = [], []
    for model in cfg.models():
        split = "train" if cfg.select == "train-runs" else "val"
        log = meta_test(l2o, model, data.split(split), seeds, cfg.horizon, batch_size=cfg.batch_size,
                        dtype=cfg.torch_dtype, device=device, warn_diverged=False)  # scored inf below
        per_run = log.total("train_loss") / cfg.horizon
        curve = log.curve("train_loss")  # (T, S)
        finite = bool(np.all(np.isfinite(curve)))
        scores.append(float(np.mean(per_run)) if finite else math.inf)
        early.append(float(curve[1:EARLY_STEPS + 1].mean()) if finite else math.inf)
    return {"val_score": float(np.mean(scores)), "val_early": float(np.mean(early))}


# ---- the outer loop --------------------------------------------------------------------------
@dataclass
class MetaTrainResult:
    l2o: L2O | MLPL2O  # with the selected (best validation) phi
    best_score: float
    best_epoch: int
    skipped: int
    out_dir: Path | None
    wall_time_s: float
    log: MetricLog = field(repr=False)


def _net(cfg: MetaTrainConfig) -> dict:
    if cfg.family == "mlp":
        return mlp_net(cfg.mlp_hidden, cfg.mlp_layers, cfg.exp_mult, cfg.step_mult)
    return {"hidden": cfg.hidden, "layers": cfg.layers, "p": cfg.p, "eta": cfg.eta, "log_eps": cfg.log_eps}


def make_l2o(cfg: MetaTrainConfig, phi: dict, meta: dict | None = None) -> L2O | MLPL2O:
    """The learned optimizer of cfg.family with meta-parameters `phi` (not copied)."""
    if cfg.family == "mlp":
        return MLPL2O(phi, cfg.mlp_hidden, cfg.mlp_layers, cfg.exp_mult, cfg.step_mult, meta=meta or {})
    return L2O(phi, cfg.hidden, cfg.layers, cfg.p, cfg.eta, log_eps=cfg.log_eps, meta=meta or {})


def init_meta_params(cfg: MetaTrainConfig, dtype: torch.dtype, device) -> dict:
    """cfg.family's seeded init of phi (generator('phi', seed))."""
    if cfg.family == "mlp":
        return init_mlp_phi(generator("phi", cfg.seed), cfg.mlp_hidden, cfg.mlp_layers, dtype, device)
    phi = init_phi(generator("phi", cfg.seed), cfg.hidden, cfg.layers, dtype, device)
    if cfg.out_bias == "zero":  # drawn and then zeroed: every other tensor is as published
        phi["out.bias"].zero_()
    return phi


def _check_meta_params(cfg: MetaTrainConfig, phi, name: str) -> dict:
    """`learned.check_phi` or `mlp_lopt.check_mlp_phi` for cfg's network, in cfg's dtype."""
    if cfg.family == "mlp":
        return check_mlp_phi(phi, cfg.mlp_hidden, cfg.mlp_layers, name, cfg.torch_dtype)
    return check_phi(phi, cfg.hidden, cfg.layers, name, cfg.torch_dtype)


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def meta_train(cfg: MetaTrainConfig, out_dir: str | os.PathLike | None = None, *,
               data: data_mod.MNIST | None = None, resume: bool = False, progress: bool = True,
               stop_after_epochs: int | None = None, phi0: dict | None = None) -> MetaTrainResult:
    """Meta-train an L2O; keep the phi of the epoch with the best score (`cfg.select`):
    runs on the validation split ('val'), fresh runs on the training split ('train-runs',
    the authors'), or the epoch's own training losses ('meta-loss').

    With `out_dir`, a checkpoint (phi, meta-optimizer state, RNG states, epoch, best
    score, metric rows) is written atomically after every epoch; `resume=True`
    continues from it and ends bit-identical to an uninterrupted run. The selected
    optimizer is exported as `l2o.pt`, the meta-training curve as `metrics.csv`
    (`meta_loss`, `reg_loss`, `val_score`, `skipped`, `rollback`). With `cfg.rollback`,
    an epoch whose validation score is worse than rollback x the best restores the
    best phi and meta-optimizer state and scales the meta-lr by `rollback_cut`.
    `phi0` starts from given meta-parameters (fine-tuning a trained L2O) instead of
    the seeded init. `stop_after_epochs` ends the call early (as a kill would), for tests."""
    cfg.validate()
    started = time.time()
    device = resolve_device(cfg.device)
    dtype = cfg.torch_dtype
    data = data or data_mod.load_mnist()
    train = tuple(t.to(device) for t in data.split("train"))
    models = cfg.models()
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None

    phi = init_meta_params(cfg, dtype, device)
    if phi0 is None and cfg.init_from is not None:
        phi0 = dict(l2o_from_checkpoint(cfg.init_from).phi)
    if phi0 is not None:
        if set(phi0) != set(phi) or any(phi0[k].shape != phi[k].shape for k in phi):
            raise L2OError(f"phi0 does not match the network of this config (family {cfg.family}: "
                           f"{', '.join(FAMILY_FIELDS[cfg.family][:2])})")
        phi = {k: phi0[k].detach().to(dtype=dtype, device=device).clone() for k in phi}
    phi = {k: v.requires_grad_(True) for k, v in phi.items()}
    opt = torch.optim.Adam(phi.values(), lr=cfg.meta_lr)
    name = "+".join(m.name for m in models)
    log = MetricLog("meta-train", name, "l2o", [cfg.seed], beta=cfg.beta if cfg.reg else None)
    total_steps = cfg.total_meta_steps()
    st = {"epoch": 0, "meta_step": 0, "best_score": math.inf, "best_epoch": -1, "skipped": 0,
          "rollbacks": 0, "lr_scale": 1.0,
          "best_phi": {k: v.detach().clone() for k, v in phi.items()}, "best_opt": None,
          "started": started, "earlier_s": 0.0}  # wall time: this call's, plus that of the calls it resumes

    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = read_checkpoint(ckpt_path, cfg)
        try:
            with torch.no_grad():
                for k in phi:
                    phi[k].copy_(ck["phi"][k])
            opt.load_state_dict(ck["opt"])
            st.update({k: ck[k] for k in _STATE_KEYS})
            st["best_phi"] = {k: v.to(device) for k, v in ck["best_phi"].items()}
            st["best_opt"] = ck["best_opt"]
            st["earlier_s"] = float(ck.get("wall_s", 0.0))  # absent in checkpoints before it was kept
            log.entries = [(m, s, v) for m, s, v in ck["log"]]
            torch.set_rng_state(ck["rng"]["torch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise L2OError(f"{ckpt_path} is damaged ({type(e).__name__}); remove it to start over "
                           "(CLI: --overwrite)") from None
    elif ckpt_path is not None and ckpt_path.exists() and not resume:
        raise L2OError(f"{ckpt_path} exists; pass resume=True to continue it, or remove it to start over "
                       "(CLI: --resume, --overwrite)")

    l2o = make_l2o(cfg, phi)
    bar = tqdm(total=total_steps, initial=st["meta_step"], disable=not progress,
               desc=f"meta-train {name}", unit="unroll", dynamic_ncols=True)
    epochs_done_here = 0
    try:
        for epoch in range(st["epoch"], cfg.epochs):
            st["drifting"] = 0  # consecutive drifting unrolls (the collapse flag), per epoch
            first_step = st["meta_step"]
            if cfg.estimator == "tbptt":
                for run in range(cfg.epoch_runs(epoch)):
                    model = models[(epoch * cfg.runs + run) % len(models)]
                    bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} run {run + 1}/{cfg.epoch_runs(epoch)} "
                                        f"val {st['best_score']:.4f}", refresh=False)
                    _one_run(cfg, l2o, opt, model, train, epoch, run, st, log, bar, device, dtype, total_steps)
            else:  # the ES family (estimators.py); one optimizee per epoch
                from .estimators import run_epoch
                run_epoch(cfg, phi, opt, models[epoch % len(models)], train, epoch, st, log, bar, device,
                          total_steps)
            scores = validation_scores(make_l2o(cfg, {k: v.detach() for k, v in phi.items()}), cfg, data)
            score = scores["val_score"]
            log.add("val_score", st["meta_step"], score)
            log.add("val_early", st["meta_step"], scores["val_early"])
            if cfg.select == "meta-loss":  # lowest mean training loss of the epoch's meta-training runs
                score = _epoch_train_loss(log, first_step)
                log.add("train_score", st["meta_step"], score)
            if score < st["best_score"]:
                st["best_score"], st["best_epoch"] = score, epoch
                st["best_phi"] = {k: v.detach().clone() for k, v in phi.items()}
                st["best_opt"] = copy.deepcopy(opt.state_dict())
            elif (cfg.rollback is not None and st["best_opt"] is not None
                  and not score <= cfg.rollback * st["best_score"]):
                _roll_back(cfg, phi, opt, st, log)  # e.g. collapsed into killing every optimizee
            st["epoch"] = epoch + 1
            bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} val {score:.4f} "
                                f"best {st['best_score']:.4f}")
            if ckpt_path is not None:
                _save_checkpoint(ckpt_path, cfg, phi, opt, st, log)
            epochs_done_here += 1
            if stop_after_epochs is not None and epochs_done_here >= stop_after_epochs:
                break
    finally:
        bar.close()

    best = make_l2o(cfg, {k: v.detach().clone() for k, v in st["best_phi"].items()},
                    meta={"best_epoch": st["best_epoch"]})
    result = MetaTrainResult(best, st["best_score"], st["best_epoch"], st["skipped"], out,
                             _wall_s(st), log)
    if out is not None and st["epoch"] == cfg.epochs:
        if st["best_epoch"] < 0:
            raise L2OError(f"no epoch of {cfg.epochs} validated (every validation run diverged: "
                           f"{st['skipped']} meta-steps skipped); refusing to export an untrained l2o.pt; "
                           "try a smaller eta or meta_lr")
        export(best, cfg, st, out / "l2o.pt")
        write_run(out, {"kind": "meta-train", "config": cfg.to_dict(), "best_score": st["best_score"],
                        "best_epoch": st["best_epoch"], "skipped": st["skipped"],
                        "data_source": data.source, "data_digest": data.digest},
                  log.rows(), device=device, started=started - st["earlier_s"])
    return result


def _epoch_train_loss(log: MetricLog, first_step: int) -> float:
    """Mean minibatch training loss (before each update) over the meta-steps from
    `first_step` on (inf when every one was skipped)."""
    values = [float(v) for m, s, v in log.entries if m == "unroll_loss" and s >= first_step]
    return float(np.mean(values)) if values else math.inf


def _roll_back(cfg, phi, opt, st, log) -> None:
    """Back to the best validated phi and its meta-optimizer state; the meta-lr is
    multiplied by `rollback_cut`."""
    with torch.no_grad():
        for k in phi:
            phi[k].copy_(st["best_phi"][k])
    opt.load_state_dict(copy.deepcopy(st["best_opt"]))
    st["rollbacks"] += 1
    st["lr_scale"] *= cfg.rollback_cut
    log.add("rollback", st["meta_step"], st["rollbacks"])


def _one_run(cfg, l2o, opt, model, train, epoch, run, st, log, bar, device, dtype, total_steps):
    """One optimizee run (B tasks) of `run_horizon(epoch)` steps = that / unroll meta-steps.

    Health monitor, logged every meta-step: `meta_grad_norm` (before clipping), `drift`
    (|mean u| / mean |u| over the coordinates of each update, averaged over the unroll)
    and `dead_frac` (hidden units of the optimizee with a flat activation on the whole
    last minibatch). With `cfg.collapse`, a collapse (see COLLAPSE_UNROLLS) is logged and,
    once some epoch has validated, abandons the run and rolls phi back to the best one."""
    seeds = [derive_seed("train", cfg.seed, epoch, run, task) for task in range(cfg.tasks)]
    params = init_params(model, seeds, dtype, device)
    batchers = [data_mod.Batcher(*train, batch_size=cfg.batch_size, seed=s, device=device)
                for s in seeds]
    last = {}

    def next_batch():
        last["x"], last["y"] = data_mod.stack_batches(batchers)
        return last["x"], last["y"]

    state = l2o.init(params, batch_ndim=1)
    x, y = next_batch()
    loss0, grads, _ = model.loss_and_grad(params, x.to(dtype), y)
    per_run = cfg.run_horizon(epoch, run) // cfg.unroll
    done = 0
    for _ in range(per_run):
        for group in opt.param_groups:
            group["lr"] = meta_lr(cfg, st["meta_step"], total_steps, st["lr_scale"])
        out = unroll(l2o, model, params, state, grads, next_batch, cfg.unroll,
                     meta_loss=cfg.meta_loss, reg=cfg.reg, beta=cfg.beta, reg_measure=cfg.reg_measure,
                     loss_index=cfg.loss_index, loss0=loss0)
        loss = out.meta_loss.mean()
        ok = bool(torch.isfinite(loss))
        if ok:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads_phi = [p.grad for p in opt.param_groups[0]["params"]]
            ok = _finite(grads_phi)
        if not ok:  # skip this meta-step and restart: the rest of this run is abandoned
            opt.zero_grad(set_to_none=True)
            st["skipped"] += 1
            log.add("skipped", st["meta_step"], st["skipped"])
            _skip_rest_of_run(st, bar, per_run - done)
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads_phi]))
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.clip_grad)
        opt.step()
        drift = float(out.drift.mean())
        dead = float(model.dead_fraction(out.params, last["x"].to(dtype)).mean())
        value = loss.item()
        log.add("meta_loss", st["meta_step"], value)
        before = torch.cat([loss0.reshape(1, -1), out.losses[:-1]])  # (K, B) L(theta_s..s+K-1)
        log.add("unroll_loss", st["meta_step"], float(before.mean()))
        log.add("meta_grad_norm", st["meta_step"], float(norm))
        log.add("drift", st["meta_step"], drift)
        log.add("dead_frac", st["meta_step"], dead)
        if cfg.reg is not None and cfg.beta:
            log.add("reg_loss", st["meta_step"], float(cfg.beta * out.reg.detach().mean()))
        st["meta_step"] += 1
        done += 1
        bar.update(1)
        check_interrupt()
        bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} run {run + 1}/{cfg.epoch_runs(epoch)} "
                            f"meta-loss {value:.3f} |g| {float(norm):.2g} drift {drift:.2f} "
                            f"dead {dead:.2f} best val {st['best_score']:.4f}", refresh=False)
        chance = float(out.losses[-1].mean()) >= CHANCE * math.log(model.classes)
        dying = cfg.collapse is not None and drift > cfg.collapse and (dead >= DEAD or chance)
        st["drifting"] = st["drifting"] + 1 if dying else 0
        if st["drifting"] >= COLLAPSE_UNROLLS:
            st["drifting"] = 0
            log.add("collapse", st["meta_step"], drift)
            if st["best_opt"] is not None:  # back to a validated phi; before one exists, an
                _roll_back(cfg, l2o.phi, opt, st, log)  # untrained L2O that kills optimizees
                _skip_rest_of_run(st, bar, per_run - done)  # must train its way out, not restart
                return
        params = {k: v.detach() for k, v in out.params.items()}
        state = l2o.detach_state(out.state)
        grads, loss0 = out.grads, out.losses[-1]


def _skip_rest_of_run(st, bar, left: int) -> None:
    """Count the `left` meta-steps of an abandoned run as done (the schedule stays aligned)."""
    st["meta_step"] += left
    bar.n = st["meta_step"]
    bar.refresh()


_STATE_KEYS = ("epoch", "meta_step", "best_score", "best_epoch", "skipped", "rollbacks", "lr_scale")


def read_checkpoint(path: Path, cfg: MetaTrainConfig) -> dict:
    """A meta-training checkpoint.pt, checked before anything is restored: every entry
    present, written with `cfg` (up to the device), phi and best_phi finite tensors of
    its network (returned in cfg's dtype), counters, scores and meta-optimizer states
    that a run of `cfg` can have written, and the LSTM cell it was written with
    (`learned.adopt_fusion`: under 'auto' the resumed run takes it). L2OError (one line)
    for a truncated, garbage, impossible or foreign file."""
    name, ck = read_torch(path, "meta-training checkpoint")
    keys = ("config", "phi", "best_phi", "opt", "best_opt", "rng", "log", *_STATE_KEYS)
    missing = [k for k in keys if k not in ck] if isinstance(ck, dict) else list(keys)
    if missing:
        raise L2OError(f"{name} is not a meta-training checkpoint (missing {', '.join(missing)}); remove it "
                       "to start over (CLI: --overwrite)")
    try:
        same = _resumable(ck["config"]) == _resumable(cfg.to_dict())
    except (TypeError, ValueError, AttributeError) as e:
        raise L2OError(f"{name} has an unreadable config ({type(e).__name__}); remove it to start over "
                       "(CLI: --overwrite)") from None
    if not same:
        raise L2OError(f"{name} was written with a different config; resume with the same config, "
                       "or use a new output directory")
    for key in ("phi", "best_phi"):
        ck[key] = _check_meta_params(cfg, ck[key], f"{name} ({key})")
    for problem in _state_problems(ck, cfg):
        raise L2OError(f"{name} is damaged: {problem}; remove it to start over (CLI: --overwrite)")
    try:
        adopt_fusion(ck.get("fusion"), resolve_device(cfg.device))
    except L2OError as e:
        raise L2OError(f"{name}: {e}") from None
    return ck


def _state_problems(ck: dict, cfg: MetaTrainConfig) -> list[str]:
    """What is wrong with a checkpoint's counters, scores and meta-optimizer states ([] if
    nothing): each must be what an interrupted run of `cfg` can have written."""
    total = cfg.total_meta_steps()
    counters = {"epoch": Range(0, cfg.epochs, integer=True), "meta_step": Range(0, total, integer=True),
                "best_epoch": Range(-1, cfg.epochs - 1, integer=True),
                "skipped": Range(0, total, integer=True), "rollbacks": Range(0, total + cfg.epochs, integer=True),
                "lr_scale": Range(0, 1, lo_open=True)}
    problems = [f"{key} must be {valid}, got {ck[key]!r:.40}" for key, valid in counters.items()
                if not valid.contains(ck[key])]
    score = ck["best_score"]
    if not isinstance(score, (int, float)) or isinstance(score, bool) or math.isnan(score) \
            or (math.isinf(score) and ck["best_epoch"] != -1) or score == -math.inf:
        problems.append(f"best_score must be a finite number (inf before any epoch validated), got {score!r:.40}")
    if not problems and ck["best_epoch"] >= ck["epoch"]:
        problems.append(f"best_epoch {ck['best_epoch']} is not an epoch done (epoch {ck['epoch']})")
    for key in ("opt", "best_opt"):
        if key == "best_opt" and ck[key] is None:
            continue
        if not isinstance(ck[key], dict) or not isinstance(ck[key].get("state"), dict):
            problems.append(f"{key} is not a meta-optimizer state_dict")
        elif not all(_finite([t]) for t in tree_tensors(ck[key]["state"])):
            problems.append(f"{key} holds non-finite meta-optimizer state")
    return problems


def _resumable(config: dict) -> dict:
    """The config a checkpoint must match to be resumed (fields added later at their defaults)."""
    full = MetaTrainConfig.from_dict(config).to_dict()
    return {k: v for k, v in full.items() if k != "device"}


def _wall_s(st: dict) -> float:
    """Seconds of meta-training so far, summed over a run and the runs it resumed."""
    return st["earlier_s"] + time.time() - st["started"]


def _save_checkpoint(path: Path, cfg, phi, opt, st, log) -> None:
    tensors = [*phi.values(), *st["best_phi"].values()]
    if not _finite(tensors):
        raise L2OError("the meta-parameters became non-finite; refusing to checkpoint them; "
                       "try a smaller meta_lr or clip_grad")
    atomic_torch_save({
        "config": cfg.to_dict(),
        "net": _net(cfg),
        "phi": {k: v.detach().cpu() for k, v in phi.items()},
        "best_phi": {k: v.cpu() for k, v in st["best_phi"].items()},
        "opt": opt.state_dict(),
        "best_opt": st["best_opt"],
        "rng": {"torch": torch.get_rng_state()},
        "log": list(log.entries),
        "fusion": fusion_in_use(resolve_device(cfg.device)),
        "wall_s": _wall_s(st),
        **{k: st[k] for k in _STATE_KEYS},
    }, path)


def export(l2o: L2O | MLPL2O, cfg: MetaTrainConfig, st: dict, path: Path) -> None:
    """The selected optimizer, loadable by `learned.l2o_from_checkpoint` and `L2OOptimizer`
    (the MLP family: `MLPL2OOptimizer`; the layout of `mlp_lopt.save_mlp_l2o`)."""
    atomic_torch_save({"phi": {k: v.detach().cpu() for k, v in l2o.phi.items()}, "net": _net(cfg),
                       "config": cfg.to_dict(), "best_score": st["best_score"],
                       "best_epoch": st["best_epoch"]}, path)
