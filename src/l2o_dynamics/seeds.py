"""Seeds and content addresses: the same parts give the same seed, stream and hash."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

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
