"""The bias/variance diagnostic of the meta-gradient estimators (estimators.py).

At a fixed phi, each estimator (tbptt, es, pes, full-es; truncation lengths K) estimates the
gradient of ONE objective, the summed loss of a whole optimizee run of T steps,

    J(phi) = sum_{t=1..T} L(theta_t; batch_t),

theta_0 a fresh init, theta_t = theta_{t-1} + L2O_phi(grad L(theta_{t-1}; batch_{t-1})). The
truncated estimators use meta_loss 'sum', loss_index 'next' (a truncation's meta-loss is the sum of
its K losses after each update), so the sum of their T / K meta-gradients over one run is their
estimate of grad J: unbiased for PES (of the Gaussian-smoothed J), truncated for TBPTT and ES (they
drop every effect of a truncation's updates on later truncations; TBPTT also drops the Hessian terms,
being first order in the optimizee gradients). full-es estimates the gradient of the run's mean loss,
J / T, from one whole run: times T. The reference is the exact grad J on the same task (same init,
same minibatches): autograd through all T steps, the optimizee gradients differentiated too
(`full_run_gradient`, torch's own LSTM cell, independent of the estimators' code).

Each of R draws is an independent task (init and data order from report seed 100 + r) and an
independent perturbation stream. Per (phi, estimator, K), `summarize` gives: the cosine of each
draw's estimate to that draw's reference (mean, standard error), the per-coordinate variance of the
estimate across draws, the squared bias (an unbiased estimate of |E[estimate - reference]|^2), and the
seconds per estimate. The reference is also computed in float64: where rounding turns it (J is rough
at that phi), `conditioned_draws` leaves that draw out. `diagnose` runs it all; `table` renders the markdown table;
`plotting.estimator_figure` draws the figure from the written JSON.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import estimators as E
from .errors import L2OError, Range
from .files import atomic_torch_save
from .learned import L2O
from .meta import RANGES
from .optimizees import Optimizee
from .seeds import REPORT, generator

DRAWS = Range(2, 1000, integer=True)  # at least two: a variance across draws
HORIZON = Range(1, 10_000, integer=True)  # the reference holds the graph of the whole run in memory
BATCH = Range(1, 55_000, integer=True)  # the images of MNIST's training split

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DiagnosticConfig:
    estimators: tuple[str, ...] = E.ESTIMATORS
    unrolls: tuple[int, ...] = (10, 20, 50)  # K for tbptt, es, pes (full-es runs whole runs)
    horizon: int = 100  # T, the run length
    draws: int = 4  # R independent tasks and perturbation streams
    pairs: int = 8  # antithetic pairs N (es, pes, full-es)
    sigma: float = 0.01
    batch_size: int = 128

    def validate(self) -> "DiagnosticConfig":
        """A one-line L2OError for a setting outside its range, an unknown estimator, or a K that
        does not divide the horizon."""
        if not self.estimators:
            raise L2OError(f"no estimators given; valid: {', '.join(E.ESTIMATORS)}")
        bad = [e for e in self.estimators if e not in E.ESTIMATORS]
        if bad or len(set(self.estimators)) != len(self.estimators):
            raise L2OError(f"estimators {list(self.estimators)}: each once, from {', '.join(E.ESTIMATORS)}")
        HORIZON.check("horizon", self.horizon)
        DRAWS.check("draws", self.draws)
        RANGES["pairs"].check("pairs", self.pairs)
        RANGES["sigma"].check("sigma", self.sigma)
        BATCH.check("batch_size", self.batch_size)
        if any(e != "full-es" for e in self.estimators):
            if not self.unrolls:
                raise L2OError("no truncation lengths given; give K values that divide the horizon (e.g. 10,20,50)")
            bad = [k for k in self.unrolls if isinstance(k, bool) or not isinstance(k, int) or k < 1
                   or k > self.horizon or self.horizon % k]
            if bad or len(set(self.unrolls)) != len(self.unrolls):
                raise L2OError(f"truncation lengths {list(self.unrolls)}: each once, each a divisor of the "
                               f"horizon ({self.horizon}) in 1..{self.horizon}")
        if not self.cells():
            raise L2OError(f"nothing to measure: es and pes need a truncation length below the horizon "
                           f"({self.horizon}); full-es and tbptt run at any")
        return self

    def cells(self) -> list[tuple[str, int]]:
        """(estimator, K) of every row: full-es once, with K = horizon (the whole run); es and pes
        not at K = horizon (there they are full-horizon ES, the full-es row), tbptt there too (the
        whole run's first-order gradient)."""
        out = []
        for e in self.estimators:
            if e == "full-es":
                out.append((e, self.horizon))
            else:
                out += [(e, k) for k in self.unrolls if e == "tbptt" or k < self.horizon]
        return out


# ---- the numbers --------------------------------------------------------------------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) of two flat vectors; nan when either is zero."""
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return math.nan
    return float(torch.dot(a, b) / (na * nb))


def summarize(estimates: torch.Tensor, references: torch.Tensor) -> dict:
    """estimates, references (R, d): draw r's estimate and the exact gradient on draw r's task.

    cosine, cosine_se   mean over draws of cos(estimate_r, reference_r), its standard error
    variance            per-coordinate variance of the estimate across draws (ddof 1), mean over
                        coordinates (variance_median: the median coordinate's)
    rel_variance        the summed variance over the mean |reference|^2: noise as a share of the
                        gradient's own size
    rel_bias2           |mean error|^2 - sum_j var_j(error) / R over the mean |reference|^2, with
                        error_r = estimate_r - reference_r: an unbiased estimate of |E error|^2
                        (noise alone can make it negative)
    rel_error           mean over draws of |error_r| / |reference_r|"""
    if estimates.shape != references.shape or estimates.ndim != 2 or len(estimates) < 2:
        raise L2OError(f"summarize needs estimates and references of one shape (R >= 2, d); got "
                       f"{tuple(estimates.shape)} and {tuple(references.shape)}")
    r = len(estimates)
    cos = torch.tensor([cosine(e, g) for e, g in zip(estimates, references)], dtype=torch.float64)
    var = estimates.var(0, unbiased=True)
    err = estimates - references
    ref2 = float((references ** 2).sum(1).mean())
    bias2 = float((err.mean(0) ** 2).sum() - err.var(0, unbiased=True).sum() / r)
    rel_err = (torch.linalg.vector_norm(err, dim=1) / torch.linalg.vector_norm(references, dim=1)).mean()
    return {"cosine": float(cos.mean()), "cosine_se": float(cos.std(unbiased=True) / math.sqrt(r)),
            "cosines": cos.tolist(), "variance": float(var.mean()), "variance_median": float(var.median()),
            "rel_variance": float(var.sum()) / ref2 if ref2 else math.nan,
            "rel_bias2": bias2 / ref2 if ref2 else math.nan, "rel_error": float(rel_err)}


# ---- the exact reference --------------------------------------------------------------------------
def _preprocess(g: torch.Tensor, p: float, log_eps: float) -> torch.Tensor:
    """`learned.preprocess`, differentiable in g (the library's detaches it)."""
    big = g.abs() >= math.exp(-p)
    mag = g.abs().clamp_min(math.exp(-p)) + log_eps
    first = torch.where(big, torch.log(mag) / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], dim=-1)


def full_run_gradient(net: L2O, phi: Params, model: Optimizee, params: Params, batches) -> tuple[Params, float]:
    """(grad J(phi), J(phi)) on one task: `params` the init, `batches` the T + 1 minibatches
    (x, y) in order (the first gives the first gradient). Autograd through every step, the
    optimizee gradients built with create_graph (their Hessian terms included), the LSTM by
    torch.lstm_cell."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    names = list(model.shapes())
    with torch.enable_grad():
        theta = {k: params[k].detach().clone().requires_grad_(True) for k in names}
        x, y = batches[0]
        loss = model.loss(theta, x.to(phi[next(iter(phi))].dtype), y)
        grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=True)
        n = sum(v.numel() for v in theta.values())
        dtype, device = grads[0].dtype, grads[0].device
        h = [torch.zeros(n, net.hidden, dtype=dtype, device=device) for _ in range(net.layers)]
        c = [torch.zeros(n, net.hidden, dtype=dtype, device=device) for _ in range(net.layers)]
        total = 0.0
        steps = len(batches) - 1
        for t in range(1, steps + 1):
            inp = _preprocess(torch.cat([g.reshape(-1) for g in grads]), net.p, net.log_eps)
            for layer in range(net.layers):
                pre = f"lstm{layer}."
                h[layer], c[layer] = torch.lstm_cell(inp, (h[layer], c[layer]), leaves[pre + "weight_ih"],
                                                     leaves[pre + "weight_hh"], leaves[pre + "bias_ih"],
                                                     leaves[pre + "bias_hh"])
                inp = h[layer]
            u = net.eta * (inp @ leaves["out.weight"].T + leaves["out.bias"]).reshape(-1)
            i, new = 0, {}
            for k in names:
                new[k] = theta[k] + u[i:i + theta[k].numel()].reshape(theta[k].shape)
                i += theta[k].numel()
            theta = new
            x, y = batches[t]
            loss = model.loss(theta, x.to(dtype), y)
            total = total + loss
            if t < steps:
                grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=True)
        out = torch.autograd.grad(total, list(leaves.values()))
    return {k: v.detach() for k, v in zip(leaves, out)}, float(total.detach())


def run_estimate(kind: str, k: int, cfg: DiagnosticConfig, net: L2O, phi: Params, model: Optimizee,
                 params: Params, batches, gen: torch.Generator, dtype, device) -> Params:
    """One estimate of grad J by `kind` with truncation K on one task: the sum of its T / K
    meta-gradients over the run (full-es: T times its one whole-run estimate of grad J / T)."""
    s = E.Settings(estimator=kind, tasks=1, unroll=k, horizon=cfg.horizon, offsets=False, pairs=cfg.pairs,
                   sigma=cfg.sigma, meta_loss="sum", loss_index="next", full_es_loss="mean")
    est = E.make(s, net, model, lambda b, run: (params, iter(batches)), gen, dtype, device)
    if kind == "full-es":
        return {key: v * cfg.horizon for key, v in est.estimate(phi).grad.items()}
    total = None
    for _ in range(cfg.horizon // k):
        g = est.estimate(phi).grad
        total = g if total is None else {key: total[key] + g[key] for key in g}
    return total


def _flat(tree: Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in tree.values()])


REFERENCE_BYTES_PER_STATE = 12  # graph bytes per LSTM state entry and step, per dtype byte (measured:
# 2.4 GB for T = 100 on leaky_relu, 15,910 coordinates x 20 hidden x 2 layers, float32)


def reference_memory(cfg: DiagnosticConfig, model: Optimizee, l2o: L2O, dtype: torch.dtype) -> int:
    """Bytes the exact reference's graph holds at its peak: the float64 check's when `dtype` is
    narrower (it runs too), else `dtype`'s."""
    size = max(torch.finfo(dtype).bits, 64) // 8
    return REFERENCE_BYTES_PER_STATE * size * cfg.horizon * model.num_params * l2o.hidden * l2o.layers


def check_memory(cfg: DiagnosticConfig, model: Optimizee, l2os: dict[str, L2O], dtype: torch.dtype,
                 device: torch.device) -> None:
    """L2OError, before any work, when the reference's graph would not fit in the memory
    `device` has available (unknown: not checked)."""
    from .meta import available_memory

    need = max(reference_memory(cfg, model, l2o, dtype) for l2o in l2os.values())
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        raise L2OError(f"the exact reference over a horizon of {cfg.horizon} steps needs about "
                       f"{need / 2**30:.3g} GiB but {device} has {free / 2**30:.3g} GiB available; lower --horizon")


def diagnose(l2os: dict[str, L2O], model: Optimizee, train, cfg: DiagnosticConfig, *,
             dtype: torch.dtype = torch.float32, device="cpu", progress: bool = False,
             done: dict | None = None, save=None) -> dict:
    """The diagnostic of every (estimator, K) of `cfg` at each phi of `l2os` ({label: L2O}) on
    `model`, tasks from `train` = (x uint8 (n, 784), y). Returns the JSON-ready result: config,
    per phi the reference's numbers and one row per (estimator, K) (`summarize` plus seconds).

    Resumable: `done` ({label: {draw: record}}, from an earlier call's `save`, or {}) holds the
    references and estimates already computed, which are taken as they are; `save(done)` is
    called after each new reference and each new estimate (a `Checkpoint` writes it to disk).
    Every estimate draws from its own seeded generator, so a resumed diagnostic equals an
    uninterrupted one in every number but the seconds of the parts run again."""
    from tqdm.auto import tqdm

    from .data import Batcher

    cfg.validate()
    device = torch.device(device)
    check_memory(cfg, model, l2os, dtype, device)
    cells = cfg.cells()
    seeds = list(REPORT[:cfg.draws])
    done = {} if done is None else done
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # noqa: E731
    bar = tqdm(total=len(l2os) * cfg.draws * (len(cells) + 1), disable=not progress, desc="estimators",
               initial=done_count(done))
    out = {"config": {**asdict(cfg), "optimizee": model.name, "seeds": seeds, "dtype": str(dtype),
                      "device": str(device), "threads": torch.get_num_threads(),
                      "objective": "J = sum_{t=1..T} L(theta_t; batch_t), T = horizon",
                      "reference": "autograd through the whole run, optimizee gradients differentiated"},
           "phis": {}}
    for label, l2o in l2os.items():
        phi = {k: v.to(dtype=dtype, device=device) for k, v in l2o.phi.items()}
        net = L2O(phi, l2o.hidden, l2o.layers, l2o.p, l2o.eta, log_eps=l2o.log_eps)
        records = done.setdefault(label, {})
        for r, seed in enumerate(seeds):
            rec = records.get(r)
            if rec is not None and len(rec["cells"]) == len(cells):
                continue
            params = model.init(generator("init", seed), dtype=dtype, device=device)
            batcher = Batcher(*train, batch_size=cfg.batch_size, seed=seed, device=device)
            batches = [next(batcher) for _ in range(cfg.horizon + 1)]
            if rec is None:
                rec = records[r] = _reference_record(net, phi, model, params, batches, dtype, sync)
                if save:
                    save(done)
                bar.update(1)
            for kind, k in cells:
                key = f"{kind}:{k}"
                if key in rec["cells"]:
                    continue
                gen = generator("estimator-diagnostic", seed, kind, k)
                wall, cpu = [], []
                with _clock(wall, cpu, sync):
                    e = run_estimate(kind, k, cfg, net, phi, model, params, batches, gen, dtype, device)
                rec["cells"][key] = {"estimate": _flat(e).double().cpu(), "wall": wall[0], "cpu": cpu[0]}
                if save:
                    save(done)
                bar.set_postfix_str(f"{label} draw {r + 1}/{cfg.draws} {kind} K={k}", refresh=False)
                bar.update(1)
        out["phis"][label] = _phi_result(l2o, phi, [records[r] for r in range(len(seeds))], cells, cfg)
    bar.close()
    return out


def done_count(done: dict) -> int:
    """The references and estimates a `diagnose` record `done` holds."""
    return sum(1 + len(rec["cells"]) for recs in done.values() for rec in recs.values())


def _reference_record(net: L2O, phi: Params, model: Optimizee, params: Params, batches, dtype, sync) -> dict:
    """One draw's exact gradient (flat, float64), J, its cosine to the float64 one (when `dtype` is
    narrower) and its seconds; `cells` to be filled with the estimates."""
    wall, cpu = [], []
    with _clock(wall, cpu, sync):
        g, value = full_run_gradient(net, phi, model, params, batches)
    stability = None
    if dtype != torch.float64:  # the same gradient in float64: how much rounding moves it
        g64, _ = full_run_gradient(net, {k: v.double() for k, v in phi.items()}, model,
                                   {k: v.double() for k, v in params.items()},
                                   [(x.double(), y) for x, y in batches])
        stability = cosine(_flat(g64).cpu(), _flat(g).double().cpu())
    return {"reference": _flat(g).double().cpu(), "J": value, "cosine_float64": stability,
            "wall": wall[0], "cpu": cpu[0], "cells": {}}


def _phi_result(l2o: L2O, phi: Params, records: list[dict], cells, cfg: DiagnosticConfig) -> dict:
    """One phi's part of the result from its draws' records."""
    ref = torch.stack([rec["reference"] for rec in records])
    ref_var = ref.var(0, unbiased=True)
    stability = [rec["cosine_float64"] for rec in records if rec["cosine_float64"] is not None]
    rows = []
    for kind, k in cells:
        got = [rec["cells"][f"{kind}:{k}"] for rec in records]
        wall = statistics.median(c["wall"] for c in got)
        rows.append({"estimator": kind, "unroll": k, **summarize(torch.stack([c["estimate"] for c in got]), ref),
                     "seconds": wall, "cpu_seconds": statistics.median(c["cpu"] for c in got),
                     "seconds_per_meta_step": wall / (1 if kind == "full-es" else cfg.horizon // k),
                     "finite": bool(all(torch.isfinite(c["estimate"]).all() for c in got))})
    return {"l2o": l2o.config(), "meta_params": sum(v.numel() for v in phi.values()),
            "reference": {"seconds": statistics.median(rec["wall"] for rec in records),
                          "cpu_seconds": statistics.median(rec["cpu"] for rec in records),
                          "J": [rec["J"] for rec in records],
                          "grad_norm": [float(torch.linalg.vector_norm(g)) for g in ref],
                          "variance": float(ref_var.mean()), "variance_median": float(ref_var.median()),
                          "rel_variance": float(ref_var.sum() / (ref ** 2).sum(1).mean()),
                          "cosine_float64": stability,
                          "cosine_float64_mean": statistics.mean(stability) if stability else 1.0},
            "rows": rows}


# ---- checkpoint: a killed diagnostic resumes where it stopped --------------------------------------
CHECKPOINT = "estimators.ckpt.pt"
CHECKPOINT_KIND = "l2o-dynamics estimator diagnostic checkpoint"


def fingerprint(l2os: dict[str, L2O], model: Optimizee, cfg: DiagnosticConfig, dtype: torch.dtype,
                device: torch.device, fusion: str) -> dict:
    """What determines the diagnostic's numbers: settings, optimizee, dtype, device type, the LSTM
    cell in use (its rounding differs) and each phi's exact bytes."""
    def digest(phi: Params) -> str:
        h = hashlib.sha256()
        for k in sorted(phi):
            h.update(k.encode())
            h.update(phi[k].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    return {"config": asdict(cfg), "optimizee": model.name, "dtype": str(dtype), "device": device.type,
            "fusion": fusion, "l2os": {label: digest(l2o.phi) for label, l2o in l2os.items()}}


class Checkpoint:
    """`out/CHECKPOINT`: the references and estimates done so far, written atomically after each.
    `load` gives them back for a run with the same fingerprint; a checkpoint of another run is
    refused in one line (with `discard`: started over), and a file of that name that this tool
    did not write, or a link there, is never read, replaced or removed."""

    def __init__(self, out: Path, fp: dict):
        self.path, self.fp = Path(out) / CHECKPOINT, fp
        self.ours = False  # the file at path is one this run verified (`load`) or wrote (`save`)

    def load(self, discard: bool = False) -> dict:
        if not os.path.lexists(self.path):
            return {}
        if self.path.is_symlink() or not self.path.is_file():
            raise L2OError(f"{self.path} is not a file this tool wrote; move it away or choose another --out")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            ours = isinstance(state, dict) and state.get("kind") == CHECKPOINT_KIND
        except Exception:  # noqa: BLE001 - unreadable: not ours
            ours = False
        if not ours:
            raise L2OError(f"{self.path} is not a checkpoint of this diagnostic; move it away or choose another --out")
        if state["fingerprint"] == self.fp:
            self.ours = True
            return state["done"]
        if discard:
            self.ours = True
            return {}
        changed = sorted(k for k in self.fp if state["fingerprint"].get(k) != self.fp.get(k))
        raise L2OError(f"{self.path} is the checkpoint of a diagnostic with other settings ({', '.join(changed)} "
                       "differ); rerun that command to finish it, or pass --overwrite to start over")

    def save(self, done: dict) -> None:
        atomic_torch_save({"kind": CHECKPOINT_KIND, "fingerprint": self.fp, "done": done}, self.path)
        self.ours = True

    def remove(self) -> None:
        """Once the results are written: the checkpoint this run loaded or wrote is not needed."""
        if self.ours:
            self.path.unlink(missing_ok=True)
            self.ours = False


@contextlib.contextmanager
def _clock(wall: list, cpu: list, sync):
    """Append the block's wall-clock and CPU seconds (after `sync`: CUDA work finished)."""
    sync()
    w, c = time.perf_counter(), time.process_time()
    yield
    sync()
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)


WELL_CONDITIONED = 0.99  # cos(float32 exact gradient, float64 one) at or above: rounding does not turn it


def conditioned_draws(reference: dict) -> list[int]:
    """The draws whose exact gradient float rounding does not turn: cosine to the same gradient in
    float64 at least WELL_CONDITIONED (every draw of a float64 run)."""
    cos = reference.get("cosine_float64") or []
    return [r for r in range(len(reference["grad_norm"])) if not cos or cos[r] >= WELL_CONDITIONED]


def conditioned_cosine(row: dict, reference: dict) -> float:
    """A row's mean cosine over the `conditioned_draws` (nan if none)."""
    draws = conditioned_draws(reference)
    return statistics.mean(row["cosines"][r] for r in draws) if draws else math.nan


def table(result: dict) -> str:
    """The markdown table of a `diagnose` result (or of its JSON)."""
    c = result["config"]
    lines = [f"{c['optimizee']}, T = {c['horizon']} steps, batch {c['batch_size']}, {c['draws']} draws "
             f"(report seeds {c['seeds'][0]}-{c['seeds'][-1]}), N = {c['pairs']} pairs, sigma = {c['sigma']:g}, "
             f"{c['dtype'].removeprefix('torch.')}, {c['device']}, {c['threads']} thread(s)", "",
             "| phi | estimator | K | cosine to exact, all draws | cosine, well-conditioned draws | "
             "variance / coord | s / estimate | CPU s / estimate |", "|---|---|---|---|---|---|---|---|"]
    for label, ph in result["phis"].items():
        ref = ph["reference"]
        stable = ", ".join(f"{v:.3f}" for v in ref["cosine_float64"]) or "float64 run"
        lines.append(f"| {label} | exact (reference) | {c['horizon']} | to float64: {stable} | "
                     f"{len(conditioned_draws(ref))} of {c['draws']} draws | {ref['variance']:.3g} (tasks) | "
                     f"{ref['seconds']:.2f} | {ref['cpu_seconds']:.2f} |")
        for row in ph["rows"]:
            lines.append(f"| {label} | {row['estimator']} | {row['unroll']} | {row['cosine']:.3f} ± "
                         f"{row['cosine_se']:.3f} | {conditioned_cosine(row, ref):.3f} | "
                         f"{row['variance']:.3g} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} |")
    return "\n".join(lines) + "\n"
