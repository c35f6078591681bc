"""Bad input on every subcommand and option: exit code 2, exactly one line on stderr
saying what is wrong and what is valid, and nothing created, before any work.

The cases run in-process through `cli.main` (each fails at validation, well under a
second); a few run as real processes to prove the exit-code path. MNIST loading is
replaced by a guard that raises, so a case that slips past validation into real work
fails loudly instead of passing slowly."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from l2o_dynamics import cli, data, learned
from l2o_dynamics.meta import recipe
from l2o_dynamics.errors import Range
from cli_checks import one_line_exit_2, tree

FILE = "afile"  # an existing regular file in the working directory

# (argv, a fragment the one-line error must contain)
CASES = [
    (["reproduce", "--meta-seeds", "3", "--out", "o"], "--meta-seeds 3 needs --l2os train"),
    (["reproduce", "--l2os", "train", "--meta-seeds", "0", "--out", "o"], "--meta-seeds"),
    (["reproduce", "--l2os", "train", "--meta-seeds", "1.5", "--out", "o"], "--meta-seeds"),
    # meta-test: every numeric option non-finite, out of range, malformed
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "inf", "--out", "o"],
     "'auto' or a finite number in (0, 100], got 'inf'"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "nan", "--out", "o"], "got 'nan'"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "-1", "--out", "o"], "got '-1'"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "0", "--out", "o"], "got '0'"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "3e38", "--out", "o"], "got '3e38'"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "fast", "--out", "o"], "'fast'"),
    (["meta-test", "--optimizer", "l2o", "--checkpoint", "pretrained:leaky_relu", "--optimizee", "relu",
      "--lr", "0.1", "--out", "o"], "--lr applies to the baselines"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--steps", "1000000000000", "--out", "o"],
     "--steps: must be an integer in 1..1000000"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--steps", "1e12", "--out", "o"], "'1e12'"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--seeds", "0", "--out", "o"], "--seeds"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--batch-size", "100000", "--out", "o"],
     "1..55000"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--eval-every", "-3", "--out", "o"], "--eval-every"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--record-symmetry", "0", "--out", "o"],
     "--record-symmetry"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--device", "tpu", "--out", "o"], "valid: cpu"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--out", FILE], "is not a directory"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--out", f"{FILE}/sub"], "is a file"),
    (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", FILE, "--out", "o"],
     "cannot read checkpoint"),
    (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", "pretrained:nope", "--out", "o"],
     "available:"),
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--checkpoint", "x.pt", "--out", "o"],
     "applies to --optimizer l2o only"),
    # meta-train: values checked before any work (--meta-lr inf used to fail after an epoch)
    (["meta-train", "--meta-lr", "inf", "--out", "o"], "--meta-lr: must be a finite number in (0, 1]"),
    (["meta-train", "--meta-lr", "3e38", "--out", "o"], "got 3e38"),
    (["meta-train", "--eta", "inf", "--out", "o"], "--eta"),
    (["meta-train", "--eta", "0", "--out", "o"], "--eta"),
    (["meta-train", "--p", "nan", "--out", "o"], "--p"),
    (["meta-train", "--beta", "-1", "--reg", "rescale", "--out", "o"], "--beta"),
    (["meta-train", "--beta", "1", "--out", "o"], "beta=1 needs reg"),
    (["meta-train", "--optimizee", ",", "--out", "o"], "comma-separated list"),
    (["meta-train", "--optimizee", "relu,,sigmoid", "--out", "o"], "comma-separated list"),
    (["meta-train", "--optimizee", "resnet", "--out", "o"], "valid: sigmoid"),
    (["meta-train", "--epochs", "0", "--out", "o"], "--epochs"),
    (["meta-train", "--epochs", "1000000", "--runs", "1000000", "--out", "o"], "at most 10,000,000"),
    (["meta-train", "--unroll", "7", "--out", "o"], "multiple of unroll"),
    (["meta-train", "--curriculum", ",", "--out", "o"], "comma-separated integers"),
    (["meta-train", "--curriculum", "20,-20", "--out", "o"], "got -20"),
    (["meta-train", "--curriculum", "30", "--out", "o"], "curriculum horizons"),
    (["meta-train", "--short-runs", "1", "--out", "o"], "[0, 1)"),
    (["meta-train", "--rollback", "1", "--out", "o"], "(1, 1e+06]"),
    (["meta-train", "--rollback-cut", "2", "--out", "o"], "(0, 1]"),
    (["meta-train", "--collapse", "1", "--out", "o"], "(0, 1)"),
    (["meta-train", "--clip-grad", "inf", "--out", "o"], "--clip-grad"),
    (["meta-train", "--seed", "-1", "--out", "o"], "--seed"),
    (["meta-train", "--hidden", "0", "--out", "o"], "--hidden"),
    (["meta-train", "--layers", "100", "--out", "o"], "1..16"),
    (["meta-train", "--tasks", "0", "--out", "o"], "--tasks"),
    (["meta-train", "--val-runs", "0", "--out", "o"], "--val-runs"),
    (["meta-train", "--batch-size", "0", "--out", "o"], "--batch-size"),
    (["meta-train", "--batch-size", "6000", "--out", "o"], "1..5000"),
    (["meta-train", "--init-from", FILE, "--out", "o"], "cannot read checkpoint"),
    (["meta-train", "--init-from", "nope.pt", "--out", "o"], "does not exist"),
    (["meta-train", "--device", "xpu", "--out", "o"], "valid: cpu"),
    (["meta-train", "--out", FILE], "is not a directory"),
    (["meta-train", "--out", f"{FILE}/x"], "is a file"),
    # reproduce / experiment / plot / data
    (["reproduce", "--out", FILE], "is not a directory"),
    (["reproduce", "--out", "o", "--store", FILE], "--store"),
    (["reproduce", "--out", "o", "--docs", f"{FILE}/d"], "--docs"),
    (["reproduce", "--out", "o", "--workers", "-1"], "0..256"),
    (["reproduce", "--out", "o", "--device", "tpu"], "valid: cpu"),
    (["reproduce", "--out", "o", "--ray-address", "nohost"], "HOST:PORT"),
    (["reproduce", "--out", "o", "--ray-address", "h:99999"], "HOST:PORT"),
    (["reproduce", "--out", "o", "--profile", "huge"], "choose from"),
    (["experiment", "noise", "--out", "o", "--seeds", "0"], "--seeds"),
    (["experiment", "symmetry-breaking", "--out", "o", "--cov-unit", "sample"], "noise experiment only"),
    (["experiment", "noise", "--out", FILE], "is not a directory"),
    (["plot", "nowhere"], "does not exist"),
    (["plot", FILE], "not an l2o-dynamics metrics.csv"),
    (["plot", ".", "--out", "x.txt"], ".png"),
    (["plot", "."], "no metrics.csv"),
    (["data", "fetch", "--idx-dir", "nowhere"], "--idx-dir"),
]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh working directory holding one file; MNIST loading raises (no case may get there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / FILE).write_text("not a checkpoint\n")

    def no_work(*args, **kwargs):
        raise AssertionError("validation let a bad input through to loading MNIST")

    monkeypatch.setattr(data, "load_mnist", no_work)
    return tmp_path


@pytest.mark.parametrize("argv,expect", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(argv, expect, cwd, capsys):
    before = tree(cwd)
    line = one_line_exit_2(argv, capsys)
    assert expect in line
    assert tree(cwd) == before


def _net(**over):
    return {"hidden": 20, "layers": 2, "p": 10.0, "eta": 0.1, **over}


def _phi(**over):
    return {**learned.init_phi(torch.Generator().manual_seed(0)), **over}


# malformed checkpoints: (what is wrong, the object saved, a fragment of the error)
CHECKPOINTS = [
    ("no net", {"phi": _phi()}, "no 'phi'/'net' entries"),
    ("a list", [1, 2], "no 'phi'/'net' entries"),
    ("phi a list", {"phi": list(_phi().values()), "net": _net()}, "phi must be a dict of tensors"),
    ("wrong shape", {"phi": _phi(**{"out.weight": torch.zeros(1, 7)}), "net": _net()}, "expected floating (1, 20)"),
    ("missing key", {"phi": {k: v for k, v in _phi().items() if k != "out.bias"}, "net": _net()},
     "missing ['out.bias']"),
    ("3 layers", {"phi": _phi(), "net": _net(layers=3)}, "3-layer network"),
    ("NaN weights", {"phi": _phi(**{"out.bias": torch.tensor([float("nan")])}), "net": _net()}, "non-finite"),
    ("huge weights", {"phi": _phi(**{"out.bias": torch.tensor([1e30])}), "net": _net()}, "huge"),
    ("p = nan", {"phi": _phi(), "net": _net(p=float("nan"))}, "net p must be"),
    ("eta a string", {"phi": _phi(), "net": _net(eta="0.1")}, "net eta must be"),
    ("integer weights", {"phi": _phi(**{"out.bias": torch.tensor([1])}), "net": _net()}, "torch.int64"),
]


@pytest.mark.parametrize("command", ["meta-test", "meta-train"])
@pytest.mark.parametrize("blob,expect", [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS])
def test_a_malformed_checkpoint_is_refused_in_one_line(blob, expect, command, cwd, capsys):
    torch.save(blob, cwd / "bad.pt")
    before = tree(cwd)
    argv = (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", "bad.pt", "--out", "o"]
            if command == "meta-test" else ["meta-train", "--init-from", "bad.pt", "--out", "o"])
    assert expect in one_line_exit_2(argv, capsys)
    assert tree(cwd) == before


def test_a_truncated_checkpoint_is_refused_in_one_line(cwd, capsys):
    torch.save({"phi": _phi(), "net": _net()}, cwd / "good.pt")
    blob = (cwd / "good.pt").read_bytes()
    (cwd / "cut.pt").write_bytes(blob[: len(blob) // 2])
    line = one_line_exit_2(["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", "cut.pt",
                             "--out", "o"], capsys)
    assert "cannot read checkpoint 'cut.pt'" in line and not (cwd / "o").exists()


def _resume_checkpoint(**over) -> dict:
    cfg = recipe("default")
    ck = {"config": cfg.to_dict(), "phi": _phi(), "best_phi": _phi(), "opt": {}, "best_opt": None,
          "rng": {}, "log": [], "epoch": 1, "meta_step": 1, "best_score": 1.0, "best_epoch": 0,
          "skipped": 0, "rollbacks": 0, "lr_scale": 1.0}
    return {**ck, **over}


@pytest.mark.parametrize("content,expect", [
    (b"garbage", "cannot read meta-training checkpoint"),
    ("truncated", "cannot read meta-training checkpoint"),
    ({"phi": 1}, "missing config"),
    (_resume_checkpoint(config=[1]), "unreadable config"),
    (_resume_checkpoint(config={**recipe("default").to_dict(), "epochs": 7}), "different config"),
    (_resume_checkpoint(phi=_phi(**{"out.weight": torch.zeros(3)})), "(phi): phi['out.weight']"),
    (_resume_checkpoint(best_phi=[1.0]), "(best_phi): phi must be a dict"),
], ids=["garbage", "truncated", "missing keys", "config a list", "other config", "wrong shape", "best_phi a list"])
def test_a_damaged_resume_checkpoint_is_refused_before_any_work(content, expect, cwd, capsys):
    run = cwd / "run"
    run.mkdir()
    if isinstance(content, bytes):
        (run / "checkpoint.pt").write_bytes(content)
    elif content == "truncated":
        torch.save(_resume_checkpoint(), run / "checkpoint.pt")
        (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:300])
    else:
        torch.save(content, run / "checkpoint.pt")
    before = {p: p.read_bytes() for p in run.iterdir()}
    assert expect in one_line_exit_2(["meta-train", "--resume", "--out", "run"], capsys)
    assert {p: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_dir_is_refused(cwd, capsys):
    locked = cwd / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "not writable" in one_line_exit_2(["reproduce", "--out", "locked/o"], capsys)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("argv,expect", [
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "inf", "--out", "o"], "got 'inf'"),
    (["meta-train", "--optimizee", ",", "--out", "o"], "comma-separated list"),
    (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", FILE, "--out", "o"],
     "cannot read checkpoint"),
], ids=["lr inf", "optimizee comma", "garbage checkpoint"])
def test_a_real_process_exits_2_with_one_line_and_no_traceback(argv, expect, tmp_path):
    (tmp_path / FILE).write_text("not a checkpoint\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "l2o_dynamics", *argv], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE]


@pytest.mark.parametrize("valid,inside,outside", [
    (Range(0, 1, lo_open=True), [1e-300, 0.5, 1, np.float32(0.5)], [0, -1, 1.0000001, math.inf, math.nan, True, "0.5"]),
    (Range(0, 1, hi_open=True), [0, 0.999], [1, -1e-300, -math.inf]),
    (Range(1, 10, integer=True), [1, 10, np.int64(3)], [0, 11, 3.0, 2.5, math.nan, False]),
], ids=["(0, 1]", "[0, 1)", "1..10"])
def test_a_range_admits_exactly_its_finite_interval(valid, inside, outside):
    assert all(valid.contains(v) for v in inside)
    assert not any(valid.contains(v) for v in outside)
