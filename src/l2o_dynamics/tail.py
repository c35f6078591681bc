"""Tail-index estimators for gradient/update noise, and the top eigenvalue of the
update covariance. Pure functions: tensors or arrays in, python floats out.

Tail index alpha in (0, 2] of a symmetric alpha-stable law: smaller = heavier
tails, 2 = Gaussian. Every estimator returns its raw estimate, never clipped: a
value above 2 is informative (lighter than stable, or too few samples), so clip
with min(alpha, 2) where a stable-law alpha is needed. `math.inf` means the data
show no growth at all (block sums no larger than single samples).

Exact zeros are missing values: log|0| is undefined, and sign-like or ReLU
updates hold many of them. They are dropped before blocking, so the estimators
see the nonzero part of the law, whose tail index is the law's own.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import eigsh

from .utils import L2OError

# -----------------------------------------------------------------------------
# helpers


def _numpy64(x, name: str = "x") -> np.ndarray:
    """Tensor or array-like -> float64 numpy array; non-finite values are an error."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    else:
        x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise L2OError(f"{name} contains nan or inf; valid: finite values only")
    return x


def _matrix64(X, name: str = "X") -> np.ndarray:
    X = _numpy64(X, name)
    if X.ndim != 2:
        raise L2OError(f"{name} has shape {tuple(X.shape)}; valid: a 2-D (N samples, d) matrix")
    return X


def _norms(x: np.ndarray) -> np.ndarray:
    """(n,) -> |x_i|; (n, d) -> ||x_i|| over rows."""
    return np.abs(x) if x.ndim == 1 else np.linalg.norm(x, axis=1)


def _auto_m(n: int) -> int:
    """block_size(n) when it is at least sqrt(n)/2, else isqrt(n) (prime n, n = 2p, ...);
    the caller then uses the first K*m samples, dropping fewer than sqrt(n)."""
    if n < 4:
        raise L2OError(f"only {n} samples after dropping exact zeros; valid: at least 4")
    m = block_size(n)
    return m if 4 * m * m >= n else math.isqrt(n)


def _check_m(m, n: int) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 2 <= m <= n // 2:
        raise L2OError(f"block size m={m!r} for {n} nonzero samples; valid: an integer 2 <= m <= {n // 2}")
    return int(m)


def _inv_alpha(x: np.ndarray, m: int) -> float:
    """1/alpha = (mean_k log||Y_k|| - mean_i log||X_i||) / log m.
    x: (n,) or (n, d) nonzero samples; Y_k: sums of m consecutive rows of the first K*m.
    Block sums that are exactly zero (lattice data, e.g. +-1) are left out of the mean."""
    k = x.shape[0] // m
    x = x[: k * m]
    ny = _norms(x.reshape(k, m, *x.shape[1:]).sum(1))
    ny = ny[ny > 0]
    if ny.size == 0:
        return -math.inf
    return float((np.log(ny).mean() - np.log(_norms(x)).mean()) / math.log(m))


def _alpha(inv: float) -> float:
    return 1.0 / inv if inv > 0 else math.inf


# -----------------------------------------------------------------------------
# Mohammadi, Mohammadpour & Ogata (2015), Cor. 2.4


def block_size(n: int) -> int:
    """Largest divisor of n not above sqrt(n) (the studied choice of m, N = K*m).
    It is 1 for prime n; the estimators then fall back to m = isqrt(n) (see mohammadi)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 4:
        raise L2OError(f"block_size(n={n!r}); valid: an integer n >= 4")
    m = math.isqrt(n)
    while n % m:
        m -= 1
    return m


def mohammadi(x, m: int | None = None) -> float:
    """Pooled estimator of the studied work: x of any shape is flattened row-major
    (numpy .ravel()) to N scalar samples, exact zeros dropped, then
    1/alpha = (mean_k log|Y_k| - mean_i log|X_i|) / log m on the first K*m samples.
    m=None: block_size(N), or isqrt(N) when that is below sqrt(N)/2 (e.g. prime N,
    where block_size is 1 and log m = 0). Assumes centred noise; nothing is subtracted.
    Pooling coordinates of different scales biases alpha down; see mohammadi_std."""
    x = _numpy64(x).ravel()
    x = x[x != 0]
    m = _auto_m(x.size) if m is None else _check_m(m, x.size)
    return _alpha(_inv_alpha(x, m))


def mohammadi_vector(X, m: int | None = None) -> float:
    """Vector form: X (N, d), rows are samples; 1/alpha from the norms of rows and of
    sums of m consecutive rows. Rows of norm 0 are dropped; m as in mohammadi."""
    X = _matrix64(X)
    X = X[_norms(X) > 0]
    m = _auto_m(X.shape[0]) if m is None else _check_m(m, X.shape[0])
    return _alpha(_inv_alpha(X, m))


def standardize(X, eps: float = 0.0) -> np.ndarray:
    """X (N, d) samples x coordinates -> (N, d') float64, each coordinate divided by a
    robust scale: 1.4826 * median|x - median| (= sigma for Gaussians). Where that is
    <= eps (over half the samples equal the median, e.g. sparse coordinates) it is
    sqrt(pi/2) * mean|x - median| instead; coordinates where both are <= eps are
    dropped (eps=0: only constant ones). Values are not re-centred."""
    X = _matrix64(X)
    dev = np.abs(X - np.median(X, axis=0))
    scale = 1.4826 * np.median(dev, axis=0)
    low = scale <= eps
    scale[low] = math.sqrt(math.pi / 2) * dev[:, low].mean(0)
    keep = scale > eps
    return X[:, keep] / scale[keep]


def mohammadi_std(X, m: int | None = None) -> float:
    """Per-coordinate standardised pooled estimator. X (N samples, d coordinates) is
    standardised, then pooled coordinate-major (X.T.ravel()) so that a block sums
    consecutive samples of one coordinate; with m=None, m is chosen from N as in
    mohammadi (m <= sqrt(N)), so blocks never mix coordinates when m divides N and
    there are no zeros; otherwise the few blocks at coordinate boundaries sum samples
    that standardising has put on one scale. Gaussian noise with very different
    coordinate scales gives ~2 here, where the pooled mohammadi reports heavy tails."""
    X = _matrix64(X)
    Z = standardize(X)
    if Z.shape[1] == 0:
        raise L2OError("X has no non-constant coordinate; valid: at least one coordinate that varies")
    z = Z.T.ravel()
    z = z[z != 0]
    m = _auto_m(X.shape[0]) if m is None else m
    return _alpha(_inv_alpha(z, _check_m(m, z.size)))


def mohammadi_multi(x, ms=None) -> float:
    """Pooled estimator averaged over block sizes: 1/mean_m(1/alpha_m) on the flat
    nonzero samples (averaging 1/alpha, the quantity linear in the logs).
    ms=None: 8 sizes spaced geometrically over [N^0.3, N^0.7]. It helps with variance
    and with awkward N: at N = 1e5 its sd is 0.024 against 0.039 for mohammadi's
    m = 250 (alpha = 2), and no m depends on N's divisors. It does not help with bias:
    for laws only in a stable domain of attraction (Student-t) every m is biased."""
    x = _numpy64(x).ravel()
    x = x[x != 0]
    n = x.size
    if n < 4:
        raise L2OError(f"only {n} nonzero samples; valid: at least 4")
    if ms is None:
        ms = sorted({min(max(round(v), 2), n // 2) for v in np.geomspace(n ** 0.3, n ** 0.7, 8)})
    if len(ms) == 0:
        raise L2OError("ms is empty; valid: one or more block sizes")
    return _alpha(float(np.mean([_inv_alpha(x, _check_m(m, n)) for m in ms])))


# -----------------------------------------------------------------------------
# Hill (1975)


def hill(x, k: int | None = None) -> float:
    """Hill estimator on |x| flattened, zeros dropped: with X_(1) >= X_(2) >= ...,
    alpha = 1 / mean_{i<=k} log(X_(i) / X_(k+1)). k=None: round(sqrt(N)).
    Estimates the exponent of a power-law tail, so it is reliable only for heavy
    tails (alpha well below 2): for alpha-stable samples it is biased up as alpha
    nears 2 and grows without bound with N for Gaussian data. Std ~ alpha/sqrt(k)."""
    a = np.abs(_numpy64(x).ravel())
    a = a[a > 0]
    n = a.size
    if n < 2:
        raise L2OError(f"only {n} nonzero samples; valid: at least 2")
    k = round(math.sqrt(n)) if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise L2OError(f"hill k={k!r} for {n} nonzero samples; valid: an integer 1 <= k <= {n - 1}")
    a = np.partition(a, n - k - 1)  # a[n-k-1] = X_(k+1), a[n-k:] = the k largest
    gamma = float(np.log(a[n - k:]).mean() - math.log(a[n - k - 1]))
    return _alpha(gamma)


# Each takes a 2-D (N samples, d) noise matrix and returns a float.
ESTIMATORS: dict[str, Callable[..., float]] = {
    "mohammadi": mohammadi,
    "mohammadi_std": mohammadi_std,
    "hill": hill,
    "mohammadi_multi": mohammadi_multi,
}

# -----------------------------------------------------------------------------
# update covariance


def top_eigenvalue_gram(U, center=None, chunk: int = 1024) -> dict:
    """Largest eigenvalue and trace of K = (1/N) sum_i (u_i - c)(u_i - c)^T, P x P,
    without forming K. U: (N, P) tensor or array, rows are updates; c = U.mean(0), or
    `center` (P,) (e.g. the full-batch update). K and the N x N Gram matrix
    G = (1/N) Uc Uc^T share their nonzero spectrum. G is accumulated in float64 over
    column chunks of U (lower block triangle only, then mirrored); U is never copied
    in full: memory is U, G (8 N^2 bytes) and two N x chunk float64 slices.
    Largest eigenvalue: eigvalsh for N <= 2048, else Lanczos (eigsh, k=1, 'LA').
    Returns {"max_eig": float, "trace": float (tr K = tr G), "n": N}."""
    U = torch.as_tensor(U)
    if U.ndim != 2 or U.shape[0] < 1 or U.shape[1] < 1:
        raise L2OError(f"U has shape {tuple(U.shape)}; valid: a 2-D (N samples, P) matrix with N, P >= 1")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise L2OError(f"chunk={chunk!r}; valid: an integer >= 1")
    n, p = U.shape
    if center is not None:
        c = torch.as_tensor(center).to(U.device, torch.float64).reshape(-1)
        if c.numel() != p:
            raise L2OError(f"center has {c.numel()} entries; valid: one per column of U ({p})")
    G = torch.zeros(n, n, dtype=torch.float64, device=U.device)
    for j in range(0, p, chunk):
        A = U[:, j:j + chunk].to(torch.float64)
        A = A - (A.mean(0) if center is None else c[j:j + chunk])
        for i in range(0, n, chunk):  # lower block triangle only: half the flops
            G[i:i + chunk, :i + chunk].addmm_(A[i:i + chunk], A[:i + chunk].T)
    for i in range(0, n, chunk):
        G[:i, i:i + chunk] = G[i:i + chunk, :i].T
    G /= n
    trace = G.diagonal().sum().item()
    if not math.isfinite(trace):
        raise L2OError("U or center contains nan or inf; valid: finite values only")
    if trace == 0:
        max_eig = 0.0
    elif n <= 2048:
        max_eig = torch.linalg.eigvalsh(G)[-1].item()
    else:
        v0 = np.random.default_rng(0).standard_normal(n)  # fixed start; ones is in G's null space
        max_eig = float(eigsh(G.cpu().numpy(), k=1, which="LA", v0=v0, return_eigenvectors=False)[0])
    return {"max_eig": max_eig, "trace": trace, "n": n}
