"""Meta-gradient estimators: truncated backprop (TBPTT), truncated ES, PES and full-horizon ES.

Every estimator keeps the state of B optimizee runs ("tasks": parameters, L2O states,
gradients, step counters, data streams) and answers `estimate(phi)` with an `Estimate`:
a meta-gradient for phi (no graph) and the health metrics of that meta-step. A task's run
lasts `length` optimizee steps; when it ends the task starts a fresh run (new init and data
order from its `TaskFactory`). The ES family draws antithetic perturbations
eps_i ~ N(0, sigma^2 I), i = 1..N per task, and advances the 2N runs at phi +- eps_i as one
batched forward computation (`population_update`), with no autograd graph:

  es       one truncation of K steps from the unperturbed run's state (a (2N+1)-th copy):
           g = 1/(2 N B sigma^2) sum_{i,b} eps_ib (F(phi + eps_ib) - F(phi - eps_ib)),
           F the truncation's meta-loss. Estimates the gradient of the Gaussian-smoothed
           truncated loss, the quantity TBPTT differentiates (so it shares its short-horizon bias).
  pes      Persistent ES (Vicol, Metz, Sohl-Dickstein 2021): the perturbed copies keep their own
           states across truncations; each task's accumulator xi_ib = sum of the eps_ib used so far
           in its run replaces eps_ib above, and is zeroed when the run ends. Unbiased for the
           gradient of the smoothed whole-run loss (the sum of the truncations' meta-losses).
  full-es  each meta-step runs B fresh tasks for a whole run at phi +- eps_i; F is the mean of the
           run's losses L(theta_1)..L(theta_T) ('mean') or L(theta_T) ('last'); with `sign`,
           (F+ - F-) is replaced by its sign (VeLO's variant).
  tbptt    autograd through the K steps of a truncation (meta.unroll); the reference for tests
           and benchmarks. `meta.meta_train` runs TBPTT through its own loop (`meta._one_run`),
           bit for bit as before these estimators existed; the ES family goes through `run_epoch`.

With a symmetry penalty (Settings reg, beta) every F adds beta x the deviations of the copy's
updates (`symmetry.deviation` at the parameters each was applied to): summed over a truncation's
steps as in `meta.unroll` (es, pes), averaged over the run's steps (full-es).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from . import data as data_mod
from . import symmetry
from .errors import L2OError
from .learned import KERNELS, L2O, _gate_scale, preprocess
from .mlp_lopt import MLPL2O
from .mlp_lopt import population_update as mlp_population_update
from .optimizees import Optimizee
from .optimizers import tree_map, tree_tensors
from .procs import check_interrupt
from .seeds import derive_seed, generator

ESTIMATORS = ("tbptt", "es", "pes", "full-es")
FULL_ES_LOSSES = ("mean", "last")

Params = dict[str, torch.Tensor]
# (task index, run number) -> (initial parameters without batch dims, endless (x, y) minibatches)
TaskFactory = Callable[[int, int], tuple[Params, Iterator[tuple[torch.Tensor, torch.Tensor]]]]


@dataclass
class Estimate:
    grad: Params  # meta-gradient estimate, one tensor per phi entry (no graph)
    meta_loss: float  # the estimated objective near phi (see each estimator)
    unroll_loss: float  # mean minibatch loss before each update of the unperturbed or mean copy
    drift: float  # |mean u| / mean |u| of the updates, averaged over steps and copies
    dead_frac: float  # optimizee hidden units flat on the last minibatch (first copy)
    ended: int  # task runs that ended in this meta-step
    reg_loss: float = 0.0  # beta x the symmetry penalty inside meta_loss (0 without one)


# ---- the L2O over a population of phis --------------------------------------------------
def population_update(net: L2O, phis: Params, grads: Params, state: dict, shapes: dict):
    """`L2O.update` for Q runs, each with its own phi, in one batched computation.

    phis: {name: (Q, *phi shape)}; grads: {name: (Q, *param shape)}; state {"h", "c"}: per layer
    (Q, P, H). Returns (updates {name: (Q, *param shape)}, new state). Forward only."""
    names = list(shapes)
    q = phis["out.bias"].shape[0]
    g = torch.cat([grads[k].reshape(q, -1) for k in names], dim=-1)  # (Q, P)
    n = g.shape[-1]
    x = preprocess(g.reshape(-1), net.p, net.log_eps).to(g.dtype).reshape(q, n, 2)
    hidden = net.hidden
    scale = _gate_scale(hidden, g)
    new_h, new_c = [], []
    for layer in range(net.layers):
        pre = f"lstm{layer}."
        w = torch.cat([phis[pre + "weight_ih"], phis[pre + "weight_hh"]], dim=-1) * scale[:, None]
        b = (phis[pre + "bias_ih"] + phis[pre + "bias_hh"]) * scale
        gates = torch.baddbmm(b[:, None, :], torch.cat([x, state["h"][layer]], dim=-1), w.mT)
        c, h = KERNELS.call(2, gates.reshape(-1, 4 * hidden), state["c"][layer].reshape(-1, hidden))
        new_h.append(h.reshape(q, n, hidden))
        new_c.append(c.reshape(q, n, hidden))
        x = new_h[-1]
    step = net.eta * torch.baddbmm(phis["out.bias"][:, None, :], x, phis["out.weight"].mT).reshape(q, n)
    updates, i = {}, 0
    for k in names:
        size = math.prod(shapes[k])
        updates[k] = step[:, i:i + size].reshape(q, *shapes[k])
        i += size
    return updates, {"h": new_h, "c": new_c}


def population_step(net: L2O | MLPL2O, phis: Params, grads: Params, state: dict, params: Params,
                    shapes: dict):
    """One update of Q runs with their own phis, for either family (`population_update`,
    `mlp_lopt.population_update`): (updates {name: (Q, *param shape)}, new state)."""
    if isinstance(net, MLPL2O):
        return mlp_population_update(net, phis, grads, state, params)
    return population_update(net, phis, grads, state, shapes)


def truncation_loss(losses: torch.Tensor, loss0: torch.Tensor, meta_loss: str, loss_index: str) -> torch.Tensor:
    """The meta-loss of one truncation (as `meta.unroll`, without the penalty): losses (K, ...)
    after each update, loss0 (...) before the first; returns (...)."""
    if loss_index == "current":
        losses = torch.cat([loss0[None], losses[:-1]])
    if meta_loss == "logsum":
        return losses.sum(0).log()
    if meta_loss == "sum":
        return losses.sum(0)
    return losses.log().mean(0)


# ---- per-task state ------------------------------------------------------------------------
# Copies advanced together (`Tasks.advance`): about this many coordinates in all, so that their
# LSTM states and gates stay in the CPU's cache (16 copies of leaky_relu at once do not).
COPY_GROUP_COORDS = 1 << 16
SEGMENT = 20  # steps a group advances before the next group's turn: the minibatches held at once

class Tasks:
    """B optimizee runs, each advanced as C copies (the perturbed phis of one task share its
    init and every minibatch). Tensors are (C, B, ...), the L2O's state included (`state`,
    `net.init` of the copies' parameters; the MLP's step count one per copy, since tasks start
    their runs at different times); counters are per task."""

    def __init__(self, net: L2O | MLPL2O, model: Optimizee, factory: TaskFactory, tasks: int, copies: int,
                 dtype: torch.dtype, device: torch.device):
        self.net, self.model, self.factory = net, model, factory
        self.B, self.C, self.dtype, self.device = tasks, copies, dtype, device
        self.shapes = model.shapes()
        zeros = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.params = {k: zeros(copies, tasks, *s) for k, s in self.shapes.items()}
        self.grads = {k: zeros(copies, tasks, *s) for k, s in self.shapes.items()}
        self.loss0 = zeros(copies, tasks)
        self.state = net.init(self.params, batch_ndim=2)
        if isinstance(net, MLPL2O):
            self.state["step"] = torch.zeros(copies, tasks, dtype=torch.long, device=device)
        self.step = [0] * tasks
        self.length = [0] * tasks
        self.runs = [0] * tasks  # runs started so far, per task
        self.batches: list = [None] * tasks
        self.last_x = None

    def reset(self, b: int, length: int, step: int = 0) -> None:
        """Task b starts a fresh run of `length` steps, `step` of them counted as done."""
        params, batches = self.factory(b, self.runs[b])
        self.runs[b] += 1
        self.batches[b] = batches
        params = {k: v.to(dtype=self.dtype, device=self.device) for k, v in params.items()}
        x, y = next(batches)
        loss, grads, _ = self.model.loss_and_grad(params, x.to(self.dtype), y)
        for k in self.shapes:
            self.params[k][:, b] = params[k]
            self.grads[k][:, b] = grads[k]
        self.loss0[:, b] = loss
        for t in tree_tensors(self.state):
            t[:, b] = 0
        self.step[b], self.length[b] = step, length

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(next(it) for it in self.batches))
        self.last_x = torch.stack(xs).to(self.dtype)
        return self.last_x, torch.stack(ys)

    def advance(self, phis: Params, steps: int, reg: str | None = None, reg_measure: str = "total"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`steps` L2O steps of every copy, copy (c, b) with phis[k][c, b]; returns the losses
        after each step (steps, C, B), the drift of each update (steps, C, B) and, with `reg`,
        each update's deviation from that symmetry's constraint at the parameters it was
        applied to (steps, C, B; `symmetry.deviation`, the penalty of `meta.unroll`), else zeros.

        The copies advance in groups of about COPY_GROUP_COORDS coordinates, a group through
        SEGMENT steps at a time (every copy of a task sees the same minibatches, drawn first for
        the segment): a group's LSTM states and gates then stay in the CPU's cache, where all 2N
        copies at once do not (benchmarks/estimators.py). Each copy's numbers are those of
        advancing all copies at once, up to rounding."""
        C, B = self.C, self.B
        per = max(1, min(C, COPY_GROUP_COORDS // max(1, B * self.model.num_params)))
        flat = lambda t, sl: t[sl].reshape(-1, *t.shape[2:])  # noqa: E731  (c, B, ...) -> (c B, ...)
        groups = []
        for lo in range(0, C, per):
            sl = slice(lo, min(lo + per, C))
            groups.append({"phis": {k: flat(v.expand(C, B, *v.shape[2:]), sl) for k, v in phis.items()},
                           "params": {k: flat(v, sl) for k, v in self.params.items()},
                           "grads": {k: flat(v, sl) for k, v in self.grads.items()},
                           "state": tree_map(lambda t: flat(t, sl), self.state), "c": sl.stop - sl.start,
                           "losses": [], "drifts": [], "penalties": []})
        with torch.no_grad():
            for start in range(0, steps, SEGMENT):
                batches = [self.next_batch() for _ in range(min(SEGMENT, steps - start))]
                for group in groups:
                    self._advance_group(group, batches, reg, reg_measure)
        unflat = lambda t: t.reshape(-1, B, *t.shape[1:])  # noqa: E731
        cat = lambda ts: unflat(ts[0]) if len(ts) == 1 else torch.cat([unflat(t) for t in ts])  # noqa: E731
        self.params, self.grads = ({k: cat([g[part][k] for g in groups]) for k in self.shapes}
                                   for part in ("params", "grads"))
        joined = iter([cat(ts) for ts in zip(*(tree_tensors(g["state"]) for g in groups))])
        self.state = tree_map(lambda _: next(joined), groups[0]["state"])
        joined_steps = lambda key: torch.cat([torch.stack(g[key]) for g in groups], dim=1)  # noqa: E731
        losses = joined_steps("losses")
        self.loss0 = losses[-1]
        for b in range(B):
            self.step[b] += steps
        return losses, joined_steps("drifts"), torch.zeros_like(losses) if reg is None else joined_steps("penalties")

    def _advance_group(self, group: dict, batches, reg: str | None, reg_measure: str) -> None:
        """One group of copies (all B tasks; tensors (c B, ...)) through the given minibatches:
        its params, grads and state replaced, its losses, drifts, penalties (c, B) appended."""
        B, c, phis = self.B, group["c"], group["phis"]
        params, grads, state = group["params"], group["grads"], group["state"]
        tiny = torch.finfo(self.dtype).tiny
        for x, y in batches:
            updates, state = population_step(self.net, phis, grads, state, params, self.shapes)
            u = torch.cat([v.reshape(c * B, -1) for v in updates.values()], dim=-1)
            group["drifts"].append((u.mean(-1).abs() / u.abs().mean(-1).clamp_min(tiny)).reshape(c, B))
            if reg is not None:
                dev = symmetry.deviation(reg, updates, params, self.model.structure, reg_measure)
                group["penalties"].append(dev.reshape(c, B))
            params = {k: params[k] + updates[k] for k in params}
            loss, g, _ = self.model.loss_and_grad({k: v.reshape(c, B, *v.shape[1:]) for k, v in params.items()}, x, y)
            grads = {k: v.reshape(c * B, *v.shape[2:]) for k, v in g.items()}
            group["losses"].append(loss)
        group.update(params=params, grads=grads, state=state)

    def copy_from(self, source: int) -> None:
        """Every copy of every task continues from copy `source`'s state."""
        for t in (*self.params.values(), *self.grads.values(), *tree_tensors(self.state)):
            t.copy_(t[source:source + 1].expand_as(t).clone())
        self.loss0.copy_(self.loss0[source:source + 1].expand_as(self.loss0).clone())

    def dead_fraction(self) -> float:
        first = {k: v[0] for k, v in self.params.items()}
        return float(self.model.dead_fraction(first, self.last_x).mean())


# ---- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What an estimator needs of `meta.MetaTrainConfig` (fields of the same names)."""
    estimator: str = "pes"
    tasks: int = 1
    unroll: int = 20  # K, the truncation length (es, pes, tbptt)
    horizon: int = 200  # run length, or the longest with horizon_min
    horizon_min: int | None = None  # run lengths log-uniform in [horizon_min, horizon]
    offsets: bool = True  # first runs start at a random multiple of K (tasks out of lockstep)
    pairs: int = 8
    sigma: float = 0.01
    meta_loss: str = "logsum"
    loss_index: str = "next"
    full_es_loss: str = "mean"
    sign: bool = False
    reg: str | None = None  # symmetry penalty on the updates, as meta.unroll's (None: none)
    beta: float = 0.0
    reg_measure: str = "total"

    @property
    def penalised(self) -> bool:
        return self.reg is not None and self.beta != 0

    @classmethod
    def of(cls, cfg) -> "Settings":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def run_length(s: Settings, gen: torch.Generator) -> int:
    """A run's length: `horizon`, or log-uniform in [horizon_min, horizon], rounded down to a
    multiple of the truncation K (full-es: to an integer)."""
    if s.horizon_min is None:
        return s.horizon
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    length = math.exp(math.log(s.horizon_min) + u * (math.log(s.horizon) - math.log(s.horizon_min)))
    quantum = 1 if s.estimator == "full-es" else s.unroll
    return min(max(quantum, int(length) // quantum * quantum), s.horizon)


def perturb(phi: Params, shape: tuple[int, ...], sigma: float, gen: torch.Generator) -> Params:
    """eps ~ N(0, sigma^2 I), shape (*shape, *phi shape), drawn on the CPU from `gen`."""
    return {k: (torch.randn((*shape, *v.shape), generator=gen, dtype=torch.float64) * sigma)
            .to(dtype=v.dtype, device=v.device) for k, v in phi.items()}


def antithetic(phi: Params, eps: Params, center: bool = False) -> Params:
    """{k: (2N[+1], B, ...)}: phi + eps, phi - eps (and phi itself last with `center`)."""
    out = {}
    for k, v in phi.items():
        parts = [v + eps[k], v - eps[k]]
        if center:
            parts.append(v.expand(1, *eps[k].shape[1:]))
        out[k] = torch.cat(parts)
    return out


def es_gradient(xi: Params, diff: torch.Tensor, sigma: float) -> Params:
    """1/(2 N B sigma^2) sum_{i,b} xi_ib diff_ib; xi {k: (N, B, ...)}, diff (N, B)."""
    n = diff.numel()
    return {k: torch.tensordot(diff.to(v.dtype), v, dims=2) / (2 * n * sigma ** 2) for k, v in xi.items()}


# ---- the estimators ---------------------------------------------------------------------------
class Estimator:
    """The interface: `estimate(phi)` advances the tasks by one meta-step and returns an
    `Estimate`; `restart()` abandons every task's run (after a non-finite estimate)."""

    name = ""

    def __init__(self, s: Settings, net: L2O | MLPL2O, model: Optimizee, factory: TaskFactory,
                 gen: torch.Generator, dtype: torch.dtype, device: torch.device):
        self.s, self.net, self.model, self.factory, self.gen = s, net, model, factory, gen
        self.dtype, self.device = dtype, device
        self.tasks = Tasks(net, model, factory, s.tasks, self.copies(), dtype, device)
        self.restart(offsets=s.offsets)

    def copies(self) -> int:
        return 2 * self.s.pairs

    def restart(self, offsets: bool = False) -> None:
        for b in range(self.s.tasks):
            self._new_run(b, offsets)

    def _new_run(self, b: int, offset: bool = False) -> None:
        length = run_length(self.s, self.gen)
        step = 0
        if offset:
            step = int(torch.randint(length // self.s.unroll, (), generator=self.gen)) * self.s.unroll
        self.tasks.reset(b, length, step)

    def _end_runs(self) -> int:
        ended = [b for b in range(self.s.tasks) if self.tasks.step[b] >= self.tasks.length[b]]
        for b in ended:
            self._on_end(b)
            self._new_run(b)
        return len(ended)

    def _on_end(self, b: int) -> None:
        pass

    def _advance(self, phis: Params, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`Tasks.advance` with the settings' penalty (deviations of zeros without one)."""
        return self.tasks.advance(phis, steps, self.s.reg if self.s.penalised else None, self.s.reg_measure)

    def estimate(self, phi: Params) -> Estimate:
        raise NotImplementedError


class TruncatedES(Estimator):
    name = "es"

    def copies(self) -> int:
        return 2 * self.s.pairs + 1  # the last copy runs phi itself

    def estimate(self, phi: Params) -> Estimate:
        s, n, B = self.s, self.s.pairs, self.s.tasks
        eps = perturb(phi, (n, B), s.sigma, self.gen)
        loss0 = self.tasks.loss0.clone()
        losses, drift, dev = self._advance(antithetic(phi, eps, center=True), s.unroll)
        penalty = s.beta * dev.sum(0)  # (2N+1, B), as meta.unroll's
        f = truncation_loss(losses, loss0, s.meta_loss, s.loss_index) + penalty
        grad = es_gradient(eps, f[:n] - f[n:2 * n], s.sigma)
        unroll_loss = float(torch.cat([loss0[-1][None], losses[:-1, -1]]).mean())
        dead = self.tasks.dead_fraction()
        self.tasks.copy_from(2 * n)  # every copy continues from phi's own run
        return Estimate(grad, float(f[-1].mean()), unroll_loss, float(drift.mean()), dead, self._end_runs(),
                        float(penalty[-1].mean()))


class PES(Estimator):
    name = "pes"

    def restart(self, offsets: bool = False) -> None:
        self.accum = None  # zero for every task
        super().restart(offsets)

    def estimate(self, phi: Params) -> Estimate:
        s, n, B = self.s, self.s.pairs, self.s.tasks
        eps = perturb(phi, (n, B), s.sigma, self.gen)
        self.accum = eps if self.accum is None else {k: self.accum[k] + eps[k] for k in eps}
        loss0 = self.tasks.loss0.clone()
        losses, drift, dev = self._advance(antithetic(phi, eps), s.unroll)
        penalty = s.beta * dev.sum(0)  # (2N, B)
        f = truncation_loss(losses, loss0, s.meta_loss, s.loss_index) + penalty
        grad = es_gradient(self.accum, f[:n] - f[n:], s.sigma)
        unroll_loss = float(torch.cat([loss0[None], losses[:-1]]).mean())
        dead = self.tasks.dead_fraction()
        return Estimate(grad, float(f.mean()), unroll_loss, float(drift.mean()), dead, self._end_runs(),
                        float(penalty.mean()))

    def _on_end(self, b: int) -> None:
        for v in self.accum.values():
            v[:, b] = 0


class FullES(Estimator):
    name = "full-es"

    def restart(self, offsets: bool = False) -> None:
        pass  # every meta-step starts fresh runs

    def estimate(self, phi: Params) -> Estimate:
        s, n, B = self.s, self.s.pairs, self.s.tasks
        length = run_length(s, self.gen)
        for b in range(B):
            self.tasks.reset(b, length)
        eps = perturb(phi, (n, B), s.sigma, self.gen)
        loss0 = self.tasks.loss0.clone()
        losses, drift, dev = self._advance(antithetic(phi, eps), length)
        penalty = s.beta * dev.mean(0)  # (2N, B): averaged over the run's steps, as the 'mean' loss
        f = (losses.mean(0) if s.full_es_loss == "mean" else losses[-1]) + penalty
        diff = f[:n] - f[n:]
        grad = es_gradient(eps, torch.sign(diff) if s.sign else diff, s.sigma)
        unroll_loss = float(torch.cat([loss0[None], losses[:-1]]).mean())
        return Estimate(grad, float(f.mean()), unroll_loss, float(drift.mean()), self.tasks.dead_fraction(), B,
                        float(penalty.mean()))


class TBPTT(Estimator):
    """Autograd through each truncation (first order in the optimizee gradients, as
    `meta.unroll`); B tasks, one copy each."""

    name = "tbptt"

    def copies(self) -> int:
        return 1

    def estimate(self, phi: Params) -> Estimate:
        from .meta import unroll

        s, t = self.s, self.tasks
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        l2o = replace(self.net, phi=leaves)
        params = {k: v[0] for k, v in t.params.items()}
        grads = {k: v[0] for k, v in t.grads.items()}
        state = tree_map(lambda x: x[0], t.state)
        loss0 = t.loss0[0]
        with torch.enable_grad():
            out = unroll(l2o, self.model, params, state, grads, t.next_batch, s.unroll,
                         meta_loss=s.meta_loss, loss_index=s.loss_index, loss0=loss0,
                         reg=s.reg, beta=s.beta, reg_measure=s.reg_measure)
            total = out.meta_loss.mean()
            grad = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
        t.params = {k: v.detach()[None] for k, v in out.params.items()}
        t.grads = {k: v[None] for k, v in out.grads.items()}
        t.state = tree_map(lambda x: x.detach()[None], out.state)
        t.loss0 = out.losses[-1][None]
        for b in range(s.tasks):
            t.step[b] += s.unroll
        unroll_loss = float(torch.cat([loss0[None], out.losses[:-1]]).mean())
        return Estimate(grad, float(total.detach()), unroll_loss, float(out.drift.mean()), t.dead_fraction(),
                        self._end_runs(), float(s.beta * out.reg.detach().mean()) if s.penalised else 0.0)


CLASSES = {"tbptt": TBPTT, "es": TruncatedES, "pes": PES, "full-es": FullES}


def make(s: Settings, net: L2O | MLPL2O, model: Optimizee, factory: TaskFactory, gen: torch.Generator,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Estimator:
    """The estimator `s.estimator` over `s.tasks` tasks drawn from `factory`."""
    if s.estimator not in CLASSES:
        raise L2OError(f"unknown estimator {s.estimator!r}; valid: {', '.join(ESTIMATORS)}")
    return CLASSES[s.estimator](s, net, model, factory, gen, dtype, torch.device(device))


# ---- meta-training with the ES family ---------------------------------------------------------
def meta_steps_per_epoch(cfg) -> int:
    """es, pes: runs x horizon / unroll truncations (as TBPTT); full-es: `runs` whole runs."""
    return cfg.runs if cfg.estimator == "full-es" else cfg.runs * cfg.horizon // cfg.unroll


def train_factory(cfg, model: Optimizee, train, epoch: int, device) -> TaskFactory:
    """Run r of task b in `epoch`: init and data order from derive_seed("train", seed, epoch, r, b),
    the seeds TBPTT's run r, task b of that epoch gets."""
    def factory(b: int, r: int):
        seed = derive_seed("train", cfg.seed, epoch, r, b)
        params = model.init(generator("init", seed), dtype=cfg.torch_dtype, device=device)
        return params, data_mod.Batcher(*train, batch_size=cfg.batch_size, seed=seed, device=device)
    return factory


def run_epoch(cfg, phi: Params, opt: torch.optim.Optimizer, model: Optimizee, train, epoch: int,
              st: dict, log, bar, device, total_steps: int) -> None:
    """One epoch of meta-training with cfg.estimator (es, pes or full-es).

    Each epoch starts fresh tasks (random offsets with cfg.offsets) and a perturbation stream
    generator("perturb", seed, epoch); runs still going at the epoch's end are cut there. So an
    epoch depends only on (cfg, epoch, phi, meta-optimizer state): a resume from the epoch's
    checkpoint repeats it bit for bit. A non-finite estimate skips the meta-step and restarts
    every task's run."""
    from .meta import _finite, make_l2o, meta_lr

    net = make_l2o(cfg, {k: v.detach() for k, v in phi.items()})
    est = make(Settings.of(cfg), net, model, train_factory(cfg, model, train, epoch, device),
               generator("perturb", cfg.seed, epoch), cfg.torch_dtype, device)
    params = opt.param_groups[0]["params"]
    for _ in range(meta_steps_per_epoch(cfg)):
        for group in opt.param_groups:
            group["lr"] = meta_lr(cfg, st["meta_step"], total_steps, st["lr_scale"])
        e = est.estimate({k: v.detach() for k, v in phi.items()})
        grads = [e.grad[k] for k in phi]
        step = st["meta_step"]
        if not (_finite(grads) and math.isfinite(e.meta_loss)):
            st["skipped"] += 1
            log.add("skipped", step, st["skipped"])
            est.restart()
        else:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.add("meta_loss", step, e.meta_loss)
            log.add("unroll_loss", step, e.unroll_loss)
            log.add("meta_grad_norm", step, float(norm))
            log.add("drift", step, e.drift)
            log.add("dead_frac", step, e.dead_frac)
            if cfg.reg is not None and cfg.beta:
                log.add("reg_loss", step, e.reg_loss)
            bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} {cfg.estimator} meta-loss {e.meta_loss:.3f} "
                                f"|g| {float(norm):.2g} drift {e.drift:.2f} best val {st['best_score']:.4f}",
                                refresh=False)
        st["meta_step"] += 1
        bar.update(1)
        check_interrupt()
