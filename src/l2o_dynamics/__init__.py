"""l2o-dynamics: meta-train coordinate-wise LSTM learned optimizers in PyTorch and
measure how they train (symmetry breaking, heavy-tailed noise, update covariance)."""

__version__ = "0.1.0"
