"""Probe a tiny transformer-style block (LayerNorm, MLP with ReLU, residual) on a toy task.

    python examples/tiny_transformer.py --out runs/probe-block

Task: a sequence of T tokens drawn from K symbols; the label is the most frequent
symbol (ties go to the smallest). Model on one-hot tokens (N, T, K):

    x = LN0(in_proj(tokens))            Linear -> LayerNorm: scale symmetry of in_proj
    x = x + fc2(relu(fc1(LN1(x))))      rescale LN1 -> fc1 and fc1 -> fc2 (not fc2: residual)
    logits = head(mean over T of LN2(x))   translation of head (LN2's mean-pool is not a unit map)

Trained with Adam, Lion and the shipped L2O; writes OUT/block/<optimizer>/metrics.csv and
OUT/loss.png, OUT/deviations.png, OUT/noise.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _probe_common as common  # noqa: E402

from l2o_dynamics import probes  # noqa: E402

SYMBOLS, LENGTH, WIDTH, HIDDEN = 6, 9, 16, 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj, self.ln0 = nn.Linear(SYMBOLS, WIDTH), nn.LayerNorm(WIDTH)
        self.ln1, self.fc1, self.fc2 = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
        self.ln2, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, SYMBOLS)

    def forward(self, tokens):  # (N, T, K) one-hot -> (N, K) logits
        x = self.ln0(self.in_proj(tokens))
        x = x + self.fc2(torch.relu(self.fc1(self.ln1(x))))
        return self.head(self.ln2(x).mean(1))


def toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences, one-hot (n, T, K), and labels (n,): the most frequent symbol."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(SYMBOLS, (n, LENGTH), generator=g)
    onehot = nn.functional.one_hot(tokens, SYMBOLS).float()
    return onehot, onehot.sum(1).argmax(1)  # argmax returns the first maximum


def run(args) -> None:
    names = common.check(args)
    train, test = toy(16384, args.seed), toy(2048, args.seed + 1)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    found = probes.find_symmetries(Block(), train[0][:2], loss="cross_entropy")
    print("block: " + "; ".join(f"{s.kind} {'->'.join(s.layers)}" for s in found))
    for name in names:
        torch.manual_seed(args.seed)
        seconds = common.train(Block(), name, train, test, out / "block" / name, args, "block", "probe-block")
        print(f"  {name}: {seconds:.1f} s")
    for path in common.figures(out):
        print(path)


if __name__ == "__main__":
    common.main(run, common.parser(__doc__.splitlines()[0], steps=600).parse_args())
