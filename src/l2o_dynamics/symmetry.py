"""Symmetry-induced geometric constraints on gradients (Kunin et al., ICLR 2021).

If the loss is invariant under a one-parameter group acting on a subset of
parameters, with infinitesimal generator xi_k(theta) for unit k, every gradient
satisfies <g, xi_k(theta)> = 0. We evaluate the per-unit linear functional

    c_k(v; theta) = <v, xi_k(theta)>

for any vector v (a gradient or an update) at parameters theta:

    rescale     (positively homogeneous unit between two linear maps)
                c_k = <v_wk, w_k> + v_bk b_k - <v_ak, a_k>
                (with BatchNorm the incoming pair is BN's (gamma_k, beta_k))
    scale       (Linear followed by BatchNorm)
                c_k = <v_wk, w_k> + v_bk b_k
    translation (softmax logits W h + b; one "unit" per column j of W and one for b)
                c_j = sum_i v_W[i, j],   c_b = sum_i v_b[i]

Measures of an update's deviation (all (*B,), one per stacked parameter set):

    total : | sum_k c_k |                      the studied measure (signed total)
    unit  : sum_k | c_k |                       cannot cancel between units
    rel   : sum_k |c_k| / sum_k ||v_k|| ||xi_k||   scale-free, in [0, 1]
            (v_k is v restricted to the parameters unit k's generator touches;
            each term is bounded by Cauchy-Schwarz, so the ratio is too; 0/0 := 0,
            a NaN in v or theta gives NaN)

The groups are read from the optimizee's declared `Structure`, never guessed.

As published. The study's Figure 1 did not measure every optimizer's real step
(the authors' l2o/analysis.py at db24f2b, the API its notebooks call): the L2O's
"update" there is the raw network output o with dtheta = eta * o, so its deviation is
1/eta times the step's (10x at eta = 0.1; every measure is linear in v, `rel` is
unchanged); SGD's is -lr * g with its momentum ignored, which satisfies every
constraint as the gradient does (0 up to rounding); Adam's and Lion's are their real
updates. `published_update` rebuilds that vector, and the probe records its total as
'{kind}_deviation_published' beside the corrected '{kind}_deviation' (the default).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .hooks import Probe
from .errors import L2OError
from .learned import L2O
from .optimizees import Structure
from .optimizers import SGD, _per_run
from .results import PUBLISHED

KINDS = ("rescale", "scale", "translation")
MEASURES = ("total", "unit", "rel")


def applicable(structure: Structure) -> tuple[str, ...]:
    """The symmetries this architecture actually has."""
    kinds = []
    if any(layer.homogeneous for layer in structure.hidden):
        kinds.append("rescale")
    if any(layer.batchnorm for layer in structure.hidden):
        kinds.append("scale")
    kinds.append("translation")
    return tuple(kinds)


def unit_terms(kind: str, v: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor],
               structure: Structure) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-unit (c_k, ||v_k||, ||xi_k||), each (*B, U) over all units of `kind`.

    v and theta are dicts of tensors with the same leading batch dims (theta may
    broadcast). Raises L2OError if the architecture has no such symmetry."""
    if kind not in KINDS:
        raise L2OError(f"unknown symmetry {kind!r}; valid: {', '.join(KINDS)}")
    cs, vn, xn = [], [], []

    def add(c, vsq, xsq):
        cs.append(c)
        vn.append(vsq.sqrt())
        xn.append(xsq.sqrt())

    if kind == "translation":
        vw, vb = v[structure.logits_weight], v[structure.logits_bias]
        rows = vw.shape[-2]
        add(vw.sum(-2), (vw * vw).sum(-2), torch.full_like(vw[..., 0, :], float(rows)))
        add(vb.sum(-1, keepdim=True), (vb * vb).sum(-1, keepdim=True),
            torch.full_like(vb[..., :1], float(vb.shape[-1])))
    for layer in structure.hidden:
        if kind == "scale" and layer.batchnorm:
            w, b, vw, vb = theta[layer.weight], theta[layer.bias], v[layer.weight], v[layer.bias]
            add((vw * w).sum(-1) + vb * b, (vw * vw).sum(-1) + vb * vb, (w * w).sum(-1) + b * b)
        elif kind == "rescale" and layer.homogeneous:
            win, bin_ = (layer.bn_weight, layer.bn_bias) if layer.batchnorm else (layer.weight, layer.bias)
            if layer.batchnorm:  # (gamma_k, beta_k) are scalars per unit
                w, vw = theta[win].unsqueeze(-1), v[win].unsqueeze(-1)
            else:
                w, vw = theta[win], v[win]
            b, vb = theta[bin_], v[bin_]
            a, va = theta[layer.out_weight], v[layer.out_weight]
            add((vw * w).sum(-1) + vb * b - (va * a).sum(-2),
                (vw * vw).sum(-1) + vb * vb + (va * va).sum(-2),
                (w * w).sum(-1) + b * b + (a * a).sum(-2))
    if not cs:
        raise L2OError(f"this optimizee has no {kind} symmetry; it has: {', '.join(applicable(structure))}")
    shape = torch.broadcast_shapes(*(c.shape[:-1] for c in cs))
    cat = lambda ts: torch.cat([t.expand(*shape, t.shape[-1]) for t in ts], dim=-1)  # noqa: E731
    return cat(cs), cat(vn), cat(xn)


def measures(kind: str, v, theta, structure: Structure) -> dict[str, torch.Tensor]:
    """{'total', 'unit', 'rel'} -> (*B,) for one symmetry kind (see module doc)."""
    c, vnorm, xnorm = unit_terms(kind, v, theta, structure)
    unit = c.abs().sum(-1)
    denom = (vnorm * xnorm).sum(-1)
    # 0/0 := 0 (a zero update deviates by nothing); a NaN anywhere stays NaN, never a perfect 0
    rel = torch.where(denom == 0, unit * 0, unit / denom.clamp_min(torch.finfo(denom.dtype).tiny))
    return {"total": c.sum(-1).abs(), "unit": unit, "rel": rel}


def deviation(kind: str, v, theta, structure: Structure, measure: str = "total") -> torch.Tensor:
    """One measure (*B,). kind 'all' = mean over the symmetries this architecture has.
    Differentiable in v (use with theta detached for the meta-training penalty)."""
    if measure not in MEASURES:
        raise L2OError(f"unknown deviation measure {measure!r}; valid: {', '.join(MEASURES)}")
    if kind == "all":
        kinds = applicable(structure)
        return sum(measures(k, v, theta, structure)[measure] for k in kinds) / len(kinds)
    return measures(kind, v, theta, structure)[measure]


def published_update(optimizer, grads, updates):
    """The vector the study's code measured as `optimizer`'s update (module doc, "As
    published"): an L2O's raw network output updates / eta, SGD's -lr * g (momentum
    and weight decay ignored), any other optimizer's real update. Dicts of (*B, ...)."""
    if isinstance(optimizer, L2O):
        return {k: u / optimizer.eta for k, u in updates.items()}
    if isinstance(optimizer, SGD):
        return {k: -_per_run(optimizer.lr, g) * g for k, g in grads.items()}
    return updates


def probe(every: int = 1, published: bool = True):
    """A hooks.Probe recording the deviations of the applied updates and, as a control,
    of the gradients ('grad_' prefix) every `every` steps; with `published`, also each
    kind's total deviation of `published_update` ('{kind}_deviation_published')."""
    def fn(ctx) -> dict[str, torch.Tensor]:
        out = {**record(ctx.updates, ctx.params, ctx.model.structure),
               **record(ctx.grads, ctx.params, ctx.model.structure, prefix="grad_")}
        if published:
            v = published_update(ctx.optimizer, ctx.grads, ctx.updates)
            with torch.no_grad():
                for kind in applicable(ctx.model.structure):
                    out[f"{kind}_deviation{PUBLISHED}"] = measures(kind, v, ctx.params, ctx.model.structure)["total"]
        return out

    return Probe(fn, every)


def record(v, theta, structure: Structure, prefix: str = "",
           kinds: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Every applicable kind (or those in `kinds`) and measure as metrics:
    '{prefix}{kind}_deviation', '..._deviation_unit', '..._deviation_rel' -> (*B,)."""
    out = {}
    with torch.no_grad():
        for kind in applicable(structure) if kinds is None else kinds:
            m = measures(kind, v, theta, structure)
            out[f"{prefix}{kind}_deviation"] = m["total"]
            out[f"{prefix}{kind}_deviation_unit"] = m["unit"]
            out[f"{prefix}{kind}_deviation_rel"] = m["rel"]
    return out
