"""Tail-index estimators for gradient/update noise, and the top eigenvalue of the
update covariance. Pure functions: tensors or arrays in, python floats out.

Tail index alpha in (0, 2] of a symmetric alpha-stable law: smaller = heavier
tails, 2 = Gaussian. Every estimator returns its raw estimate, never clipped: a
value above 2 is informative (lighter than stable, or too few samples), so clip
with min(alpha, 2) where a stable-law alpha is needed. `math.inf` means the data
show no growth at all (block sums no larger than single samples).

Exact zeros are missing values: log|0| is undefined, and sign-like or ReLU
updates hold many of them. They are dropped before blocking, so the estimators
see the nonzero part of the law, whose tail index is the law's own. The one
exception is `mohammadi_published`, the study's estimator exactly as its authors
ran it: log(|x| + eps) with every zero kept (each contributes log(eps) = -36 to
the mean of logs, which pulls alpha up when a share of the samples is zero).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from .errors import L2OError

# -----------------------------------------------------------------------------
# helpers


BIG = 1_000_000  # samples above which float32 input is kept in float32 (twice the speed)


def _as_samples(x, name: str = "x") -> torch.Tensor:
    """Tensor or array-like -> torch tensor on the CPU (the computations below run in
    torch for its threads): float64, except that float32 input with more than BIG
    samples stays float32 (the log-means then carry ~1e-6 relative error, far below
    the estimators' own spread). Non-finite values are an error."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    keep32 = t.dtype == torch.float32 and t.numel() > BIG
    t = t.to("cpu", torch.float32 if keep32 else torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise L2OError(f"{name} contains nan or inf; valid: finite values only")
    return t


def _as_matrix(X, name: str = "X") -> torch.Tensor:
    X = _as_samples(X, name)
    if X.ndim != 2:
        raise L2OError(f"{name} has shape {tuple(X.shape)}; valid: a 2-D (N samples, d) matrix")
    return X


def _any(mask: torch.Tensor) -> bool:
    """bool(mask.any()) of a contiguous bool tensor, read as bytes (torch's any and all on
    bool tensors are 30x slower than a max over the same bytes)."""
    return mask.numel() > 0 and bool(mask.view(torch.uint8).amax())


def _all(mask: torch.Tensor) -> bool:
    """bool(mask.all()) of a contiguous bool tensor (see `_any`)."""
    return mask.numel() == 0 or bool(mask.view(torch.uint8).amin())


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """The nonzero entries of a 1-D x, in order: x itself when it has no zero, else by
    masked_select (2-3x faster than x[mask])."""
    if int(x.count_nonzero()) == x.numel():
        return x
    return torch.masked_select(x, x != 0)


def _norms(x: torch.Tensor) -> torch.Tensor:
    """(n,) -> |x_i|; (n, d) -> ||x_i|| over rows."""
    return x.abs() if x.ndim == 1 else torch.linalg.vector_norm(x, dim=1)


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
    if ny.numel() == 0:
        return -math.inf
    acc = torch.float64
    return float((ny.log().mean(dtype=acc) - _norms(x).log().mean(dtype=acc)) / math.log(m))


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
    x = _as_samples(x).reshape(-1)
    x = x[x != 0]
    m = _auto_m(x.numel()) if m is None else _check_m(m, x.numel())
    return _alpha(_inv_alpha(x, m))


PUBLISHED_EPS = float(np.spacing(1))  # 2.2e-16, as in the authors' alpha_estimator


def mohammadi_published(x) -> float:
    """The studied work's estimator as published (the authors' `alpha_estimator`, from
    sgd_tail_index): x of any shape flattened row-major to N scalars, zeros kept,
    m = block_size(N) (no fallback), 1/alpha = (mean_k log(|Y_k| + eps) - mean_i
    log(|X_i| + eps)) / log m with eps = 2.2e-16. Computed in float64 (theirs ran in
    float32; the means differ by ~1e-7 relative). Differs from `mohammadi` only where
    x has exact zeros (and when N has no divisor near sqrt(N))."""
    x = _as_samples(x).reshape(-1)
    n = x.numel()
    m = published_block_size(n)
    if not bool((x != 0).any()):
        raise L2OError("all samples are zero; valid: noise with at least one nonzero value")
    x = x.to(torch.float64)
    y = x.reshape(n // m, m).sum(1)
    inv = float(((y.abs() + PUBLISHED_EPS).log().mean() - (x.abs() + PUBLISHED_EPS).log().mean()) / math.log(m))
    return _alpha(inv)


def published_block_size(n: int) -> int:
    """m of `mohammadi_published` for n samples (block_size(n), no fallback)."""
    m = block_size(n) if n >= 4 else 1
    if m < 2:
        raise L2OError(f"{n} samples: no divisor m >= 2 of N below sqrt(N), the published "
                       "estimator's block size; valid: N with such a divisor (not prime)")
    return m


def mohammadi_vector(X, m: int | None = None) -> float:
    """Vector form: X (N, d), rows are samples; 1/alpha from the norms of rows and of
    sums of m consecutive rows. Rows of norm 0 are dropped; m as in mohammadi."""
    X = _as_matrix(X)
    X = X[_norms(X) > 0]
    m = _auto_m(X.shape[0]) if m is None else _check_m(m, X.shape[0])
    return _alpha(_inv_alpha(X, m))


def standardize(X, eps: float = 0.0) -> np.ndarray:
    """X (N, d) samples x coordinates -> (N, d') (float64; float32 for big float32 X), each coordinate divided by a
    robust scale: 1.4826 * median|x - median| (= sigma for Gaussians; for even N the
    lower of the two middle values is the median). Where that is
    <= eps (over half the samples equal the median, e.g. sparse coordinates) it is
    sqrt(pi/2) * mean|x - median| instead; coordinates where both are <= eps are
    dropped (eps=0: only constant ones). Values are not re-centred."""
    return _standardized(_as_matrix(X), eps).numpy()  # float32 for big float32 input


def _sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for n inputs: compare-exchanges (i, j), i < j."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _lower_median(X: torch.Tensor) -> torch.Tensor:
    """torch.median over dim 0 (the lower of the two middle values for even N), exactly:
    for N <= 64 by a sorting network of element-wise min/max over whole rows (2-3x
    faster than torch.median on many short columns), else torch.median."""
    n = X.shape[0]
    if n > 64:
        return X.T.contiguous().median(1).values  # a median along the last dim is twice as fast
    rows = list(X)
    for i, j in _sorting_network(n):
        rows[i], rows[j] = torch.minimum(rows[i], rows[j]), torch.maximum(rows[i], rows[j])
    return rows[(n - 1) // 2]


def _standardized(X: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """`standardize` of a tensor already in its working dtype (column by column: a
    block of columns standardises as the whole matrix would)."""
    dev = (X - _lower_median(X)).abs()
    scale = 1.4826 * _lower_median(dev)
    low = scale <= eps
    if _any(low):
        scale[low] = math.sqrt(math.pi / 2) * dev[:, low].mean(0)
    keep = scale > eps
    return X / scale if _all(keep) else X[:, keep] / scale[keep]


def mohammadi_std(X, m: int | None = None) -> float:
    """Per-coordinate standardised pooled estimator. X (N samples, d coordinates) is
    standardised, then pooled coordinate-major (X.T.ravel()) so that a block sums
    consecutive samples of one coordinate; with m=None, m is chosen from N as in
    mohammadi (m <= sqrt(N)), so blocks never mix coordinates when m divides N and
    there are no zeros; otherwise the few blocks at coordinate boundaries sum samples
    that standardising has put on one scale. Gaussian noise with very different
    coordinate scales gives ~2 here, where the pooled mohammadi reports heavy tails."""
    X = _as_matrix(X)
    Z = torch.from_numpy(standardize(X))
    if Z.shape[1] == 0:
        raise L2OError("X has no non-constant coordinate; valid: at least one coordinate that varies")
    z = Z.T.reshape(-1)
    z = z[z != 0]
    m = _auto_m(X.shape[0]) if m is None else m
    return _alpha(_inv_alpha(z, _check_m(m, z.numel())))


def mohammadi_multi(x, ms=None) -> float:
    """Pooled estimator averaged over block sizes: 1/mean_m(1/alpha_m) on the flat
    nonzero samples (averaging 1/alpha, the quantity linear in the logs).
    ms=None: 8 sizes spaced geometrically over [N^0.3, N^0.7]. It helps with variance
    and with awkward N: at N = 1e5 its sd is 0.024 against 0.039 for mohammadi's
    m = 250 (alpha = 2), and no m depends on N's divisors. It does not help with bias:
    for laws only in a stable domain of attraction (Student-t) every m is biased."""
    x = _as_samples(x).reshape(-1)
    x = x[x != 0]
    n = x.numel()
    if n < 4:
        raise L2OError(f"only {n} nonzero samples; valid: at least 4")
    if ms is None:
        ms = multi_block_sizes(n)
    if len(ms) == 0:
        raise L2OError("ms is empty; valid: one or more block sizes")
    return _alpha(float(np.mean([_inv_alpha(x, _check_m(m, n)) for m in ms])))


def multi_block_sizes(n: int) -> list[int]:
    """`mohammadi_multi`'s default block sizes for n nonzero samples."""
    return sorted({min(max(round(v), 2), n // 2) for v in np.geomspace(n ** 0.3, n ** 0.7, 8)})


# -----------------------------------------------------------------------------
# Hill (1975)


def hill(x, k: int | None = None) -> float:
    """Hill estimator on |x| flattened, zeros dropped: with X_(1) >= X_(2) >= ...,
    alpha = 1 / mean_{i<=k} log(X_(i) / X_(k+1)). k=None: round(sqrt(N)).
    Estimates the exponent of a power-law tail, so it is reliable only for heavy
    tails (alpha well below 2): for alpha-stable samples it is biased up as alpha
    nears 2 and grows without bound with N for Gaussian data. Std ~ alpha/sqrt(k)."""
    a = _as_samples(x).reshape(-1).abs().numpy()
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


# -----------------------------------------------------------------------------
# the same statistics over a stream of pieces (noise matrices too big to copy)


def work_dtype(dtype: torch.dtype, numel: int) -> torch.dtype:
    """The dtype `_as_samples` computes in for `numel` samples of `dtype`."""
    return torch.float32 if dtype == torch.float32 and numel > BIG else torch.float64


class BlockLogs:
    """The Mohammadi statistics of a 1-D sample stream fed in pieces, in the order of the
    flattening: sums Y_k of m consecutive samples (an incomplete block is carried to the
    next piece; the one left at the end is dropped, as the estimators drop the samples
    after the first K*m), and the sums of log(|x| + eps) over the samples of complete
    blocks (summed over every sample fed, less the final carry's) and of log(|Y_k| + eps)
    over the blocks. With eps = 0, blocks that sum to exactly 0 are left out
    (`_inv_alpha`); feed nonzero samples then."""

    def __init__(self, m: int, eps: float = 0.0) -> None:
        self.m, self.eps = m, eps
        self.carry: torch.Tensor | None = None
        self.log_x = self.log_y = 0.0  # log_x: over every sample fed (the carry's are taken off at the end)
        self.n_x = self.n_y = 0

    def log_terms(self, x: torch.Tensor) -> torch.Tensor:
        """log(|x| + eps), entry by entry (a new tensor)."""
        t = x.abs()
        if self.eps:
            t.add_(self.eps)
        return t.log_()

    def logs(self, x: torch.Tensor) -> float:
        """The sum of log(|x| + eps) over x, as `feed` adds it (float64 sum)."""
        return float(self.log_terms(x).sum(dtype=torch.float64))

    def feed(self, x: torch.Tensor, logs: float | None = None) -> None:
        """Add the samples x; `logs`: their `logs(x)` if already known (two streams that share
        most samples compute it once)."""
        self.log_x += self.logs(x) if logs is None else logs
        self.n_x += x.numel()
        if self.carry is not None and self.carry.numel():  # complete the carried block first (no copy of x)
            need = self.m - self.carry.numel()
            if x.numel() < need:
                self.carry = torch.cat([self.carry, x])
                return
            self._blocks(torch.cat([self.carry, x[:need]]))
            x = x[need:]
        k = x.numel() // self.m
        self.carry = x[k * self.m:].clone()
        if k:
            self._blocks(x[:k * self.m])

    def _blocks(self, body: torch.Tensor) -> None:
        """Add the sums of complete blocks."""
        y = body.reshape(-1, self.m).sum(1).abs_()
        if self.eps:
            y.add_(self.eps)
        else:
            y = y[y > 0]
        self.log_y += float(y.log_().sum(dtype=torch.float64))
        self.n_y += y.numel()

    def inv_alpha(self) -> float:
        """1/alpha of the samples fed so far (-inf when every block sum was 0)."""
        if self.n_y == 0:
            return -math.inf
        log_x, n_x = self.log_x, self.n_x
        if self.carry is not None and self.carry.numel():  # samples after the last complete block
            log_x, n_x = log_x - self.logs(self.carry), n_x - self.carry.numel()
        return (self.log_y / self.n_y - log_x / n_x) / math.log(self.m)


class TopAbs:
    """The `k` largest |x| of a stream fed in pieces (`hill` on the whole stream)."""

    def __init__(self, k: int) -> None:
        self.k, self.top = k, None

    def feed(self, x: torch.Tensor) -> None:
        a = x.abs() if self.top is None else torch.cat([self.top, x.abs()])
        self.top = a.topk(min(self.k, a.numel())).values if a.numel() > self.k else a


def hill_of_top(top: torch.Tensor) -> float:
    """`hill` from the k + 1 largest nonzero |x| (any order), computed as `hill` computes it."""
    a = np.sort(top.numpy())  # ascending: a[0] = X_(k+1), a[1:] = the k largest
    return _alpha(float(np.log(a[1:]).mean() - math.log(a[0])))


# Each takes a 2-D (N samples, d) noise matrix and returns a float.
ESTIMATORS: dict[str, Callable[..., float]] = {
    "mohammadi_published": mohammadi_published,
    "mohammadi": mohammadi,
    "mohammadi_std": mohammadi_std,
    "hill": hill,
    "mohammadi_multi": mohammadi_multi,
}

# -----------------------------------------------------------------------------
# update covariance


def top_eigenvalue_gram(U, center=None, chunk: int = 1024, dense_max: int = 2048) -> dict:
    """Largest eigenvalue and trace of K = (1/N) sum_i (u_i - c)(u_i - c)^T, P x P,
    without forming K. U: (N, P) tensor or array, rows are updates; c = U.mean(0), or
    `center` (P,) (e.g. the full-batch update). K and the N x N Gram matrix
    G = (1/N) Uc Uc^T share their nonzero spectrum.

    N <= dense_max: G is accumulated in float64 over column chunks of U (lower block
    triangle, mirrored) and eigvalsh gives its spectrum. Larger N: G is never formed
    either; Lanczos (eigsh, k=1, 'LA') runs on the operator v -> (1/N) Uc (Uc^T v),
    each product two passes over U in its own dtype (O(N P) per iteration instead of
    O(N^2 P) to build G; in float32 when N P > 5e7, ~1e-6 relative). Returns {"max_eig", "trace" (tr K = tr G), "n": N}."""
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
    else:
        c = U.to(torch.float64).mean(0) if n <= dense_max else _column_mean(U, chunk)
    if n > dense_max:
        return _top_eigenvalue_lanczos(U, c, chunk)
    G = torch.zeros(n, n, dtype=torch.float64, device=U.device)
    for j in range(0, p, chunk):
        A = U[:, j:j + chunk].to(torch.float64) - c[j:j + chunk]
        for i in range(0, n, chunk):  # lower block triangle only: half the flops
            G[i:i + chunk, :i + chunk].addmm_(A[i:i + chunk], A[:i + chunk].T)
    for i in range(0, n, chunk):
        G[:i, i:i + chunk] = G[i:i + chunk, :i].T
    G /= n
    trace = G.diagonal().sum().item()
    if not math.isfinite(trace):
        raise L2OError("U or center contains nan or inf; valid: finite values only")
    max_eig = torch.linalg.eigvalsh(G)[-1].item() if trace else 0.0
    return {"max_eig": max_eig, "trace": trace, "n": n}


def _column_mean(U: torch.Tensor, chunk: int) -> torch.Tensor:
    total = torch.zeros(U.shape[1], dtype=torch.float64, device=U.device)
    for i in range(0, U.shape[0], chunk):
        total += U[i:i + chunk].to(torch.float64).sum(0)
    return total / U.shape[0]


def _top_eigenvalue_lanczos(U: torch.Tensor, c: torch.Tensor, chunk: int) -> dict:
    n = U.shape[0]
    # float64 products unless U is huge; float32 ones keep ~1e-6 relative accuracy
    work = torch.float32 if U.dtype == torch.float32 and U.numel() > 50_000_000 else torch.float64
    cw = c.to(work)
    trace = 0.0
    for i in range(0, n, chunk):
        A = U[i:i + chunk].to(torch.float64) - c
        trace += float((A * A).sum())
    trace /= n
    if not math.isfinite(trace):
        raise L2OError("U or center contains nan or inf; valid: finite values only")
    if trace == 0:
        return {"max_eig": 0.0, "trace": 0.0, "n": n}

    def matvec(v: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)).to(U.device, work)
        t = torch.zeros_like(cw)
        for i in range(0, n, chunk):  # t = Uc^T v
            t += U[i:i + chunk].to(work).T @ v[i:i + chunk]
        t -= cw * v.sum()
        ct = cw @ t
        w = torch.cat([U[i:i + chunk].to(work) @ t - ct for i in range(0, n, chunk)])  # Uc t
        return (w / n).to(torch.float64).cpu().numpy()

    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)  # fixed start; ones is in G's null space
    max_eig = float(eigsh(op, k=1, which="LA", v0=v0, tol=1e-10, return_eigenvectors=False)[0])
    return {"max_eig": max_eig, "trace": trace, "n": n}
