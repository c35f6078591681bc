"""Float tolerances derived from the dtype and the size of the reduction.

Summing n terms in floating point in any order errs by at most about
n * eps * sum|terms| (Higham, Accuracy and Stability of Numerical Algorithms, 4.2);
two correct implementations that reduce in different orders (other BLAS kernels,
other thread counts, batched vs single matmuls) differ by up to twice that. The
tolerances below use that bound with the scale of the compared values, so a test
passes on any machine and thread count yet still fails on any real bug (which
errs by far more than n * eps of the scale)."""
import torch


def reduction_atol(dtype: torch.dtype, n: int, scale: float, safety: float = 4.0) -> float:
    """Absolute tolerance for results of length-n reductions whose terms are ~`scale`."""
    return safety * n * torch.finfo(dtype).eps * scale
