import csv
import json
import subprocess
import sys

import pytest
import torch

from l2o_dynamics.cli import main, seed_spec
from l2o_dynamics.results import COLUMNS


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "l2o_dynamics", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,expect", [
    (["meta-test", "--optimizer", "rmsprop", "--optimizee", "relu", "--out", "X"], "choose from 'sgd', 'adam'"),
    (["meta-test", "--optimizer", "adam", "--optimizee", "resnet", "--out", "X"], "choose from 'sigmoid'"),
    (["meta-test", "--optimizer", "adam", "--optimizee", "relu", "--steps", "0", "--out", "X"],
     "must be an integer in 1..1000000"),
    (["meta-train", "--optimizee", "leaky_relu", "--reg", "scale", "--beta", "1", "--out", "X"],
     "no scale symmetry"),
    (["meta-train", "--horizon", "30", "--unroll", "20", "--out", "X"], "multiple of unroll"),
    (["reproduce", "--profile", "huge", "--out", "X"], "choose from 'smoke', 'quick', 'paper'"),
    (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--out", "X"], "needs --checkpoint"),
    (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", "nope.pt", "--out", "X"],
     "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, expect, tmp_path):
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l2o-dynamics: error:"), r.stderr
    assert expect in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("spec,seeds", [
    ("3", (100, 101, 102)),  # a count: the first 3 report seeds
    ("0-4", (0, 1, 2, 3, 4)),  # a range, both ends included
    ("100,101,107", (100, 101, 107)),
    ("0-2, 7", (0, 1, 2, 7)),  # ranges and seeds mixed
    ("7-7", (7,)),  # one seed
])
def test_seed_specs_read_a_count_as_report_seeds_and_ranges_and_lists_as_written(spec, seeds):
    assert seed_spec(spec) == seeds


@pytest.mark.parametrize("command", [
    ["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "0.1"],
    ["experiment", "noise"], ["reproduce"]], ids=["meta-test", "experiment", "reproduce"])
@pytest.mark.parametrize("spec,expect", [
    ("", "no seeds given"), ("4-2", "the range 4-2 is reversed"), ("-3", "non-negative"),
    ("1,-3", "non-negative"), ("0-1000", "more than 1000 seeds"), ("1001", "integer in 1..1000"),
    ("0", "integer in 1..1000"), ("5,5", "seed 5 is given twice"), ("1;2", "expected N")],
    ids=["empty", "reversed", "negative", "negative in a list", "too many", "count too large", "count 0",
         "repeated", "garbage"])
def test_a_bad_seed_spec_is_one_line_exit_2_and_writes_nothing(command, spec, expect, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*command, "--seeds", spec, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--seeds" in lines[0] and expect in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("argv,shown", [
    (["experiment", "symmetry-breaking", "--scale", "smoke", "--seeds", "3,8"], "selection seeds 3, 8"),
    (["experiment", "noise", "--scale", "quick"], "report seeds 100-104"),  # experiment's default: 5
    (["reproduce", "--profile", "quick", "--seeds", "100-101,107"], "report seeds 100-101, 107"),
    (["reproduce", "--profile", "paper"], "report seeds 100-104"),
])
def test_experiment_and_reproduce_meta_test_on_the_seeds_given(argv, shown, tmp_path, capsys):
    assert main([*argv, "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert f"meta-tests on {shown}\n" in capsys.readouterr().out


def test_existing_out_dir_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run_cli("meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "0.1", "--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_cli("meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "0.1", "--out",
                str(blocker / "sub"))
    assert r.returncode == 2 and "not writable" in r.stderr


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("data", "meta-test", "meta-train", "plot", "experiment", "reproduce"):
        assert cmd in r.stdout


def test_meta_test_meta_train_and_plot_end_to_end(tmp_path, mnist, capsys):
    out = tmp_path / "adam"
    assert main(["meta-test", "--optimizer", "adam", "--optimizee", "leaky_relu", "--steps", "15",
                 "--seeds", "3,8", "--lr", "0.01", "--eval-every", "5", "--record-symmetry", "5",
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.reader(open(out / "metrics.csv")))
    assert tuple(rows[0]) == COLUMNS
    metrics = {r[6] for r in rows[1:]}
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "rescale_deviation_rel"} <= metrics
    assert {r[4] for r in rows[1:]} == {"3", "8"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["seeds"] == [3, 8] and "environment" in cfg
    assert cfg["data_digest"] == mnist.digest

    mt = tmp_path / "l2o"
    assert main(["meta-train", "--optimizee", "leaky_relu", "--epochs", "1", "--runs", "1",
                 "--horizon", "10", "--unroll", "5", "--val-runs", "1", "--fusion", "eager",
                 "--out", str(mt), "--no-progress"]) == 0
    assert {"l2o.pt", "checkpoint.pt", "metrics.csv", "config.json"} <= {p.name for p in mt.iterdir()}
    ck = torch.load(mt / "l2o.pt", weights_only=True)
    assert set(ck["net"]) == {"hidden", "layers", "p", "eta", "log_eps"}
    assert main(["meta-train", "--optimizee", "leaky_relu", "--epochs", "1", "--runs", "1",
                 "--horizon", "10", "--unroll", "5", "--val-runs", "1", "--out", str(mt)]) == 2
    assert "--resume" in capsys.readouterr().err

    l2o_out = tmp_path / "l2o-test"
    assert main(["meta-test", "--optimizer", "l2o", "--checkpoint", str(mt / "l2o.pt"), "--optimizee",
                 "relu", "--steps", "10", "--seeds", "2", "--out", str(l2o_out), "--no-progress"]) == 0
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "loss.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
