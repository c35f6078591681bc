"""What rides on a meta-test's step loop: the context a probe sees and the probe itself.

`runner.meta_test` calls each due `Probe` with a `StepContext` at step t, before the
update is applied; a probe returns {metric: (S,) tensor}, one value per run. The
analyses that build probes (`symmetry.probe`, `noise.noise_probe`) import this small
module, never the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .optimizees import Optimizee, Params
from .optimizers import Optimizer


@dataclass
class StepContext:
    """What a probe sees at step t (before the update is applied)."""

    step: int
    params: Params
    grads: Params
    updates: Params
    state: Any  # optimizer state the update was computed from
    optimizer: Optimizer
    model: Optimizee


@dataclass
class Probe:
    """Calls `fn(ctx) -> {metric: (S,) tensor}` every `every` steps (and at the last)."""

    fn: Callable[[StepContext], Mapping[str, torch.Tensor]]
    every: int = 1

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 or step == steps - 1
