"""Copy docs/findings.md (written by `make demo`) into README's findings block.

    python tools/sync_readme.py          # rewrite README.md in place
    python tools/sync_readme.py --check  # exit 1 if README's block differs from docs/findings.md

The block is the text between `<!-- findings:start -->` and the paragraph that begins
"Verdicts come from"; what follows (the legend and the hand-written "What each finding
depends on") is left alone, so re-read it after a demo whose verdicts changed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- findings:start -->\n", "\nVerdicts come from"


def synced(readme: str, findings: str) -> str:
    """README text with its findings block replaced by `findings`."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"README.md lacks {START.strip()!r} or a following {END.strip()!r} paragraph")
    return head + START + findings.rstrip("\n") + "\n" + END + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    readme = ROOT / "README.md"
    old = readme.read_text()
    try:
        new = synced(old, (ROOT / "docs" / "findings.md").read_text())
    except (ValueError, FileNotFoundError) as e:
        print(f"sync_readme: {e}", file=sys.stderr)
        return 2
    if a.check:
        return int(new != old)
    if new != old:
        sys.path.insert(0, str(ROOT / "src"))
        from l2o_dynamics.files import atomic_write_text
        atomic_write_text(readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
