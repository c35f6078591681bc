"""Gradient and update noise at a frozen point of a run, and the update covariance.

At a checkpoint (theta_t, s_t) of a meta-test run, frozen:

    g_i = grad loss(theta_t; minibatch i)     i = 1..M, the whole training split
    u_i = update(g_i; s_t)                    new optimizer states are thrown away
    gradient noise g_i - mean(g),  update noise u_i - mean(u)  ->  tail index alpha

and the update covariance K = (1/N) sum_i (u_i - c)(u_i - c)^T over N minibatches
(or single examples), whose largest eigenvalue comes from the N x N Gram matrix.
Everything is computed batched (many minibatches per call); the analysed run's
tensors are only read, and no random generator of the run is touched.

Centring, exact and as published. On MNIST 8.4% of the first layer's inputs are
always blank, so those coordinates of g_i are exactly 0 and an L2O's u_i there is
one constant for every minibatch: their noise is exactly 0. `centred` (the default,
"exact") gives those exact zeros. The study centred in float32 (X - X.mean(0)),
whose mean of N equal float32 values is off by rounding, so those coordinates
hold residue ~1e-9 (log ~ -21 instead of log(eps) = -36 in the published
estimator's mean of logs): that alone raises an L2O's update alpha. Each estimator
in PLAIN_CENTRING is therefore recorded twice: on the exact centring under its own
name, and on the float32 centring as published under the name + '_published'
(`results.PUBLISHED`), which exists to explain the study's numbers.

Numerical note: an L2O's update noise also has coordinates that vary only by
rounding; `centred` zeroes them, and the pooled estimators still reproduce to ~1%
across processes (thread counts, MKL kernels), not bitwise. The '_published'
variants read the rounding itself and do not reproduce across processes.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from . import data as data_mod
from . import tail
from .optimizees import Optimizee, Params, flatten, unflatten
from .optimizers import Optimizer, tree_index
from .hooks import Probe
from .errors import L2OError
from .results import PUBLISHED
from .seeds import generator

COV_UNITS = ("minibatch", "sample")
COV_CENTERS = ("mean", "fullbatch")
DEFAULT_ESTIMATORS = ("mohammadi_published", "mohammadi", "mohammadi_std")
_SUFFIX = {"mohammadi": "", "mohammadi_std": "_std", "mohammadi_published": "_pub", "mohammadi_multi": "_multi",
           "hill": "_hill"}
# What each metric suffix measures (figures, findings and README use these words).
ESTIMATOR_LABELS = {
    "_pub": "the study's estimator (pooled, zeros kept, log(|x| + eps)), exact centring",
    "_pub" + PUBLISHED: "the study's estimator and centring as published (float32 X - mean X: "
                        "rounding residue where the noise is 0)",
    "": "pooled, exact zeros and non-varying coordinates excluded",
    "_std": "per-coordinate standardised",
}
# The estimators also recorded on the study's float32 centring (`centred_as_published`),
# as '{prefix}{suffix}_published'; every estimator reads the exact centring (`centred`).
PLAIN_CENTRING = {"mohammadi_published"}


def minibatch_gradients(model: Optimizee, params: Params, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 128, chunk: int = 64) -> torch.Tensor:
    """Gradients of the M = n // batch_size consecutive minibatches of (x uint8 (n, 784), y):
    (M, P) flattened in `model.shapes()` order. `chunk` minibatches per batched call."""
    M = x.shape[0] // batch_size
    if M < 1:
        raise L2OError(f"need at least one minibatch of {batch_size}; got {x.shape[0]} examples")
    out = []
    dtype = next(iter(params.values())).dtype
    for start in range(0, M, chunk):
        c = min(chunk, M - start)
        sl = slice(start * batch_size, (start + c) * batch_size)
        xb = data_mod.to_float(x[sl]).to(dtype).reshape(c, batch_size, -1)
        yb = y[sl].reshape(c, batch_size)
        stacked = {k: v.detach().expand(c, *v.shape) for k, v in params.items()}
        _, grads, _ = model.loss_and_grad(stacked, xb, yb)
        out.append(flatten(grads, batch_ndim=1))
    return torch.cat(out)


def sample_gradients(model: Optimizee, params: Params, x: torch.Tensor, y: torch.Tensor,
                     chunk: int = 512) -> torch.Tensor:
    """Per-example gradients (n, P) via torch.func.vmap over examples, in chunks."""
    if any(layer.batchnorm for layer in model.structure.hidden):
        raise L2OError(f"per-example gradients are undefined for {model.name} (BatchNorm uses batch "
                       "statistics); use --cov-unit minibatch")
    dtype = next(iter(params.values())).dtype
    detached = {k: v.detach() for k, v in params.items()}

    def one(p, xi, yi):
        return model.loss(p, xi.unsqueeze(0), yi.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    out = []
    for start in range(0, x.shape[0], chunk):
        xb = data_mod.to_float(x[start:start + chunk]).to(dtype)
        g = per_example(detached, xb, y[start:start + chunk])
        out.append(flatten(g, batch_ndim=1))
    return torch.cat(out)


def updates_at(optimizer: Optimizer, state, params: Params, grads_flat: torch.Tensor,
               chunk: int | None = None) -> torch.Tensor:
    """u_i = update(g_i; s) for every row g_i of grads_flat (M, P), state frozen: (M, P).
    `chunk` gradients per call; by default ~64k coordinates for the L2O (its LSTM
    activations then stay in cache) and 32 gradients for element-wise optimizers."""
    if chunk is None:
        chunk = max(1, 65536 // grads_flat.shape[1]) if getattr(optimizer, "name", "") == "l2o" else 32
    out = []
    detached = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        for start in range(0, grads_flat.shape[0], chunk):
            g = unflatten(grads_flat[start:start + chunk], detached, batch_ndim=0)
            u, _ = optimizer.update(g, state, detached)
            out.append(flatten(u, batch_ndim=1))
    return torch.cat(out)


def centred(X: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    """The exact centring: X - mean(X) over samples (N, P), with columns that do not vary
    (spread <= rel of their magnitude: dead inputs, identical updates, or updates that
    differ only by float rounding) set to exactly zero, so the estimators drop them
    consistently instead of reading rounding noise as tiny samples (log|x| of 1e-12
    dominates a mean of logs)."""
    hi, lo = X.max(0).values, X.min(0).values
    flat = (hi - lo) <= rel * torch.maximum(hi.abs(), lo.abs())
    return (X - X.mean(0)).masked_fill(flat, 0.0)


def centred_as_published(X: torch.Tensor) -> torch.Tensor:
    """The study's centring, X - X.mean(0) in X's dtype (float32 for the runs): a column of
    N equal values keeps the rounding error of their mean (~1e-9 for values ~0.1)."""
    return X - X.mean(0)


def tail_indices(noise: torch.Tensor, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
                 prefix: str = "alpha_grad", plain: torch.Tensor | None = None) -> dict[str, float]:
    """{prefix + suffix: alpha} of a centred noise matrix (N samples, P coordinates), and
    with `plain` (the same noise centred as published, `centred_as_published`) also
    {prefix + suffix + '_published': alpha} of it for the estimators in PLAIN_CENTRING."""
    out = {}
    for name in estimators:
        if name not in tail.ESTIMATORS:
            raise L2OError(f"unknown tail estimator {name!r}; valid: {', '.join(tail.ESTIMATORS)}")
        metric = prefix + _SUFFIX.get(name, "_" + name)
        out[metric] = float(tail.ESTIMATORS[name](noise))
        if plain is not None and name in PLAIN_CENTRING:
            out[metric + PUBLISHED] = float(tail.ESTIMATORS[name](plain))
    return out


def noise_alphas(G: torch.Tensor, U: torch.Tensor, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
                 published: bool = True) -> dict[str, float]:
    """alpha_grad* and alpha_update* of minibatch gradients G and updates U (N, P), every
    estimator on the exact centring (`centred`); with `published`, those in PLAIN_CENTRING
    also on the float32 centring as published ('..._published')."""
    return {**tail_indices(centred(G), estimators, "alpha_grad",
                           plain=centred_as_published(G) if published else None),
            **tail_indices(centred(U), estimators, "alpha_update",
                           plain=centred_as_published(U) if published else None)}


# ---- the same, streamed over coordinates ----------------------------------------------------------
STREAM_PIECE = 1 << 20  # samples per piece the streamed estimators read at a time


def streamed_noise(G_rows: Sequence[torch.Tensor], U_rows: Sequence[torch.Tensor],
                   estimators: Sequence[str] = DEFAULT_ESTIMATORS, published: bool = True) -> dict[str, float]:
    """`noise_alphas(G, U, estimators, published)` and the update covariance of
    `tail.top_eigenvalue_gram(U)` (cov_max_eig, cov_trace, cov_n) of the M stacked rows
    (each (P,)), without the dense (M, P) copies: two passes over the rows, the first
    over blocks of columns (centring, flat columns, standardising, the M x M Gram matrix
    of the updates), the second row by row in the pooled estimators' row-major order
    (block sums carried across pieces, `tail.BlockLogs`). Memory beyond the rows is
    O(STREAM_PIECE + M^2); the rows are centred in place (pass the caller's scratch).
    Equal to the dense functions up to the order of float reductions."""
    if len(G_rows) != len(U_rows) or not len(G_rows):
        raise L2OError(f"{len(G_rows)} gradient and {len(U_rows)} update rows; valid: the same number >= 1")
    gram = torch.zeros(len(U_rows), len(U_rows), dtype=torch.float64)
    out = {**_streamed_alphas(G_rows, estimators, "alpha_grad", published),
           **_streamed_alphas(U_rows, estimators, "alpha_update", published, gram)}
    gram /= len(U_rows)
    trace = gram.diagonal().sum().item()
    max_eig = torch.linalg.eigvalsh(gram)[-1].item() if trace else 0.0
    return {**out, "cov_max_eig": max_eig, "cov_trace": trace, "cov_n": float(len(U_rows))}


def _streamed_alphas(rows: Sequence[torch.Tensor], estimators: Sequence[str], prefix: str, published: bool,
                     gram: torch.Tensor | None = None) -> dict[str, float]:
    """`tail_indices(centred(X), estimators, prefix, plain=centred_as_published(X))` of the
    stacked rows X, streamed (see `streamed_noise`); adds the Gram matrix of the rows
    centred on their mean (float64, not divided by M) into `gram`."""
    for name in estimators:
        if name not in tail.ESTIMATORS:
            raise L2OError(f"unknown tail estimator {name!r}; valid: {', '.join(tail.ESTIMATORS)}")
    M, P = len(rows), rows[0].numel()
    work = tail.work_dtype(rows[0].dtype, M * P)
    step = max(1, STREAM_PIECE // M)
    flat = torch.empty(P, dtype=torch.bool)
    nonzero, plain_nonzero, kept = 0, False, 0
    std = tail.BlockLogs(tail._auto_m(M)) if "mohammadi_std" in estimators else None
    std_n = 0
    for j in range(0, P, step):  # pass 1: blocks of columns, every row
        A = torch.stack([r[j:j + step] for r in rows])
        hi, lo = A.amax(0), A.amin(0)  # a nan or inf in a column is in its max or min (40x max(0).values)
        if not bool(torch.isfinite(hi).all()) or not bool(torch.isfinite(lo).all()):
            raise L2OError(f"{prefix.replace('alpha_', '')} noise contains nan or inf; valid: finite values only")
        if gram is not None:
            A64 = A.to(torch.float64)
            A64 -= A64.mean(0)
            gram.addmm_(A64, A64.T)
        f = flat[j:j + step]
        f.copy_((hi - lo) <= 1e-6 * torch.maximum(hi.abs(), lo.abs()))  # `centred`'s rule
        A -= A.mean(0)  # `centred_as_published`, kept in the rows for pass 2
        for r, a in zip(rows, A):
            r[j:j + step] = a
        plain_nonzero = plain_nonzero or bool(A.any())
        # `centred` without its flat columns (all 0: no nonzero sample, and standardising drops them)
        C = A.index_select(1, (~f).nonzero().view(-1)) if tail._any(f) else A
        nonzero += int(C.count_nonzero())
        if std is not None:
            Z = tail._standardized(C.to(work))
            kept += Z.shape[1]
            z = tail._nonzero(Z.T.reshape(-1))
            std_n += z.numel()
            std.feed(z)
    alphas: dict[str, float] = {}
    if std is not None:
        if not kept:
            raise L2OError("X has no non-constant coordinate; valid: at least one coordinate that varies")
        tail._check_m(std.m, std_n)
        alphas["mohammadi_std"] = tail._alpha(std.inv_alpha())
    pub, pub_plain, pooled, multi, top = None, None, None, [], None
    if "mohammadi_published" in estimators:
        m = tail.published_block_size(M * P)
        if not nonzero or (published and not plain_nonzero):
            raise L2OError("all samples are zero; valid: noise with at least one nonzero value")
        pub = tail.BlockLogs(m, tail.PUBLISHED_EPS)
        pub_plain = tail.BlockLogs(m, tail.PUBLISHED_EPS) if published else None
    if "mohammadi" in estimators:
        pooled = tail.BlockLogs(tail._auto_m(nonzero))
    if "mohammadi_multi" in estimators:
        if nonzero < 4:
            raise L2OError(f"only {nonzero} nonzero samples; valid: at least 4")
        multi = [tail.BlockLogs(m) for m in tail.multi_block_sizes(nonzero)]
    if "hill" in estimators:
        if nonzero < 2:
            raise L2OError(f"only {nonzero} nonzero samples; valid: at least 2")
        top = tail.TopAbs(round(nonzero ** 0.5) + 1)
    if pub is not None or pooled is not None or multi or top is not None:
        for r in rows:  # pass 2: row-major, as the pooled estimators flatten
            for j in range(0, P, STREAM_PIECE):
                x = r[j:j + STREAM_PIECE]
                f = flat[j:j + STREAM_PIECE]
                has_flat = tail._any(f)
                e = x.masked_fill(f, 0.0) if has_flat else x  # `centred`
                if pub_plain is not None:
                    # the two streams differ at the flat columns only, where `centred` has log(0 + eps):
                    # one pass of logs for both
                    x64 = x.to(torch.float64)
                    t = pub_plain.log_terms(x64)
                    logs = float(t.sum(dtype=torch.float64))
                    pub_plain.feed(x64, logs)
                    if pub is not None and has_flat:
                        logs += int(f.count_nonzero()) * math.log(pub.eps) - float((t * f).sum(dtype=torch.float64))
                        pub.feed(e.to(torch.float64), logs)
                    elif pub is not None:
                        pub.feed(x64, logs)
                elif pub is not None:
                    pub.feed(e.to(torch.float64))
                if pooled is not None or multi or top is not None:
                    nz = tail._nonzero(e.to(work))
                    for b in ([pooled] if pooled is not None else []) + multi:
                        b.feed(nz)
                    if top is not None:
                        top.feed(nz)
    if pub is not None:
        alphas["mohammadi_published"] = tail._alpha(pub.inv_alpha())
    if pooled is not None:
        alphas["mohammadi"] = tail._alpha(pooled.inv_alpha())
    if multi:
        alphas["mohammadi_multi"] = tail._alpha(sum(b.inv_alpha() for b in multi) / len(multi))
    if top is not None:
        alphas["hill"] = tail.hill_of_top(top.top)
    out = {}
    for name in estimators:
        metric = prefix + _SUFFIX.get(name, "_" + name)
        out[metric] = alphas[name]
        if pub_plain is not None and name in PLAIN_CENTRING:
            out[metric + PUBLISHED] = tail._alpha(pub_plain.inv_alpha())
    return out


def checkpoint_noise(optimizer: Optimizer, model: Optimizee, params: Params, state,
                     train: tuple[torch.Tensor, torch.Tensor], *, batch_size: int = 128,
                     estimators: Sequence[str] = DEFAULT_ESTIMATORS, cov_unit: str = "minibatch",
                     cov_center: str = "mean", cov_n: int | None = None, seed: int = 0,
                     step: int = 0, published: bool = True) -> dict[str, float]:
    """Every noise metric of one run (unbatched params/state) at one frozen step:
    alpha_grad*, alpha_update* over all training minibatches (with `published`, also
    the '_published' variants: `noise_alphas`), and cov_max_eig, cov_trace of the
    update covariance."""
    if cov_unit not in COV_UNITS:
        raise L2OError(f"unknown --cov-unit {cov_unit!r}; valid: {', '.join(COV_UNITS)}")
    if cov_center not in COV_CENTERS:
        raise L2OError(f"unknown --cov-center {cov_center!r}; valid: {', '.join(COV_CENTERS)}")
    x, y = train
    G = minibatch_gradients(model, params, x, y, batch_size)
    U = updates_at(optimizer, state, params, G)
    metrics = noise_alphas(G, U, estimators, published)
    metrics.update(update_covariance(optimizer, model, params, state, train, unit=cov_unit,
                                     center=cov_center, n=cov_n, batch_size=batch_size,
                                     minibatch_updates=U, seed=seed, step=step))
    return metrics


def update_covariance(optimizer: Optimizer, model: Optimizee, params: Params, state,
                      train: tuple[torch.Tensor, torch.Tensor], *, unit: str = "minibatch",
                      center: str = "mean", n: int | None = None, batch_size: int = 128,
                      minibatch_updates: torch.Tensor | None = None, seed: int = 0,
                      step: int = 0) -> dict[str, float]:
    """Largest eigenvalue and trace of K = (1/N) sum_i (u_i - c)(u_i - c)^T.

    unit 'minibatch': N minibatches of `batch_size` (default a fifth of an epoch),
    drawn without replacement from the training split's minibatches; 'sample': N
    single examples (default 1000). center 'mean': c = mean update; 'fullbatch':
    c = the update of the full-batch gradient (the paper's text)."""
    x, y = train
    g = generator("covariance", seed, step)  # the run's own generators are never touched
    if unit == "minibatch":
        M = x.shape[0] // batch_size
        N = n or max(2, M // 5)
        if not 2 <= N <= M:
            raise L2OError(f"cov N={N} minibatches is out of range; valid: 2..{M}")
        pick = torch.randperm(M, generator=g)[:N]
        if minibatch_updates is not None:
            U = minibatch_updates[pick.to(minibatch_updates.device)]
        else:
            idx = (pick[:, None] * batch_size + torch.arange(batch_size)).reshape(-1).to(x.device)
            G = minibatch_gradients(model, params, x[idx], y[idx], batch_size)
            U = updates_at(optimizer, state, params, G)
    else:
        N = n or 1000
        if not 2 <= N <= x.shape[0]:
            raise L2OError(f"cov N={N} examples is out of range; valid: 2..{x.shape[0]}")
        idx = torch.randperm(x.shape[0], generator=g)[:N].to(x.device)
        U = updates_at(optimizer, state, params, sample_gradients(model, params, x[idx], y[idx]))
    c = None
    if center == "fullbatch":
        full = full_batch_gradient(model, params, x, y)
        c = updates_at(optimizer, state, params, full.unsqueeze(0))[0]
    res = tail.top_eigenvalue_gram(U, center=c)
    return {"cov_max_eig": float(res["max_eig"]), "cov_trace": float(res["trace"]), "cov_n": float(N)}


def full_batch_gradient(model: Optimizee, params: Params, x: torch.Tensor, y: torch.Tensor,
                        chunk: int = 5000) -> torch.Tensor:
    """Gradient of the mean loss over all of (x, y): (P,)."""
    dtype = next(iter(params.values())).dtype
    total = None
    for start in range(0, x.shape[0], chunk):
        xb = data_mod.to_float(x[start:start + chunk]).to(dtype)
        loss, grads, _ = model.loss_and_grad(params, xb, y[start:start + chunk])
        g = flatten(grads) * xb.shape[0]
        total = g if total is None else total + g
    return total / x.shape[0]


def noise_probe(train: tuple[torch.Tensor, torch.Tensor], seeds: Sequence[int], *, every: int,
                batch_size: int = 128, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
                cov_unit: str = "minibatch", cov_center: str = "mean", cov_n: int | None = None,
                published: bool = True):
    """A hooks.Probe computing `checkpoint_noise` for every run of a batched meta-test."""
    def fn(ctx) -> Mapping[str, torch.Tensor]:
        per_run = []
        for i, seed in enumerate(seeds):
            per_run.append(checkpoint_noise(
                ctx.optimizer, ctx.model, tree_index(ctx.params, i), tree_index(ctx.state, i), train,
                batch_size=batch_size, estimators=estimators, cov_unit=cov_unit,
                cov_center=cov_center, cov_n=cov_n, seed=seed, step=ctx.step, published=published))
        return {k: torch.tensor([m[k] for m in per_run], dtype=torch.float64) for k in per_run[0]}

    return Probe(fn, every)

