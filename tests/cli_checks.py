"""Checks shared by the bad-input tests: what a refused command leaves and prints."""
from pathlib import Path

from l2o_dynamics import cli


def tree(root: Path) -> set[str]:
    """Every path below `root`, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_line_exit_2(argv, capsys) -> str:
    """Run the CLI in-process: it must exit 2 with exactly one stderr line under one prefix."""
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("l2o-dynamics: error: ") and err[0].count("error:") == 1, err[0]
    return err[0]
