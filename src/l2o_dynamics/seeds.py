"""Seeds: content addresses, derived streams, and the seed families.

The same parts give the same seed, stream and hash (`stable_hash`, `derive_seed`,
`generator`). Which seeds a choice may see, and which ones report numbers:

A run's seed s fixes its init (`generator("init", s)`) and its data order
(`data.Batcher`, `generator("data", s)`). Every run of this project takes its seed
from one of four disjoint blocks:

    SELECTION    0 .. 99               meta-test seeds that choices may look at: the recipe
                                       and variant comparisons of docs/meta_training.md
                                       (seeds 0-4), and every meta-test this project ran
                                       before the families existed (seeds 0..S-1)
    REPORT       100 .. 9,999          meta-test seeds that report numbers (profiles, README,
                                       model cards, the quality benchmark, the findings); no
                                       choice (recipe, variant, learning rate, selected epoch)
                                       has ever read a run on them
    LR_SEARCH    10,000 .. 999,999     the baselines' learning-rate searches (validation split)
    VALIDATION   1,000,000 .. 1,999,999  meta-training's per-epoch selection runs
                                       (meta.VAL_SEEDS + i; validation split, or training
                                       split with select='train-runs'), which pick the epoch

REPORT starts at 100, not at 0, because the default recipe was chosen on meta-test
seeds 0-4 and every earlier meta-test used 0..S-1: a number measured there is not
independent of the choices made on it. The two blocks above REPORT are the searches'
and meta-training's own seeds. A meta-training's optimizee runs use
`derive_seed("train", seed, epoch, run, task)`, 63-bit hashes: the chance that one falls
into the two million seeds above is about 2e-13 per run.

A count of seeds ("5 seeds") means the first N report seeds, `report_seeds(5)` =
100..104. Choices pass selection seeds explicitly (`selection_seeds(5)` = 0..4).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch

from .errors import L2OError
from .files import json_default


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hex digest of the canonical JSON of `obj` (content address of a config)."""
    blob = json.dumps(obj, sort_keys=True, default=json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends on every part (e.g. ("init", seed) vs ("data", seed))."""
    return int(stable_hash([str(p) for p in parts], 16), 16) & ((1 << 63) - 1)


def generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by `derive_seed(*parts)`: same parts, same stream."""
    return torch.Generator().manual_seed(derive_seed(*parts))


# ---- seed families ------------------------------------------------------------------
SELECTION = range(0, 100)
REPORT = range(100, 10_000)
LR_SEARCH = range(10_000, 1_000_000)
VALIDATION = range(1_000_000, 2_000_000)
FAMILIES = {"selection": SELECTION, "report": REPORT, "lr-search": LR_SEARCH, "validation": VALIDATION}
MAX_SEEDS = 1000  # meta-test seeds in one run (each is a batched optimizee run)
MAX_SEED = (1 << 63) - 1  # derive_seed's range; any int up to it names a stream


def _first(family: range, n: int, name: str) -> tuple[int, ...]:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= min(MAX_SEEDS, len(family)):
        raise L2OError(f"a count of {name} seeds must be an integer in 1..{min(MAX_SEEDS, len(family))}, "
                       f"got {n!r}")
    return tuple(family[:n])


def report_seeds(n: int) -> tuple[int, ...]:
    """The first n report seeds: 100, 101, ..., 100 + n - 1."""
    return _first(REPORT, n, "report")


def selection_seeds(n: int) -> tuple[int, ...]:
    """The first n selection seeds: 0, 1, ..., n - 1 (for comparisons that choose)."""
    return _first(SELECTION, n, "selection")


def lr_search_seeds(n: int) -> tuple[int, ...]:
    """The first n learning-rate search seeds: 10,000, 10,001, ..."""
    return _first(LR_SEARCH, n, "lr-search")


def check_seeds(seeds: Sequence[int], what: str = "seeds") -> tuple[int, ...]:
    """`seeds` as a tuple, or a one-line L2OError (prefixed by `what`): they must be
    1..MAX_SEEDS distinct integers in 0..2**63-1."""
    at = f"{what}: " if what else ""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise L2OError(f"{at}expected a list of integer seeds (e.g. [100, 101, 102]), got {seeds!r}")
    if not seeds:
        raise L2OError(f"{at}no seeds given; give at least one (e.g. [100, 101, 102])")
    if len(seeds) > MAX_SEEDS:
        raise L2OError(f"{at}{len(seeds)} seeds, at most {MAX_SEEDS} are allowed")
    seen: set[int] = set()
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool):
            raise L2OError(f"{at}{s!r} is not an integer seed")
        if not 0 <= s <= MAX_SEED:
            raise L2OError(f"{at}seed {s} is out of range; seeds are integers in 0..2**63-1")
        if s in seen:
            raise L2OError(f"{at}seed {s} is given twice; each seed must be distinct")
        seen.add(s)
    return tuple(seeds)


def seed_family(seed: int) -> str:
    """The family `seed` belongs to ('selection', 'report', 'lr-search', 'validation'),
    or 'other' above them."""
    return next((name for name, block in FAMILIES.items() if seed in block), "other")


def describe_seeds(seeds: Sequence[int]) -> str:
    """Runs of consecutive seeds compressed: [100, 101, 102, 107] -> '100-102, 107'."""
    parts: list[str] = []
    i = 0
    seeds = list(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ", ".join(parts)


def families_of(seeds: Sequence[int]) -> str:
    """'report seeds 100-104' or, mixed, 'seeds 0-1, 100 (selection, report)'."""
    order = [*FAMILIES, "other"]
    fams = sorted({seed_family(s) for s in seeds}, key=order.index)
    if len(fams) == 1:
        return f"{fams[0]} seeds {describe_seeds(seeds)}"
    return f"seeds {describe_seeds(seeds)} ({', '.join(fams)})"
