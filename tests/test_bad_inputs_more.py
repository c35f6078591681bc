"""The rest of the bad-input class (issue 16): names that reach outside the shipped set,
values that underflow float32 or exhaust memory, checkpoints and metrics files damaged in
every way found, a damaged job store, unreachable Ray addresses, a full disk, Ctrl-C while
starting, and the Python API's own checks. At the CLI each is exit code 2, one line, and
nothing created; through the API, an L2OError naming the Python argument."""
import errno
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from l2o_dynamics import cli, data, learned, meta, pipeline, results, symmetry
from l2o_dynamics.experiments import build_jobs, get_profile
from l2o_dynamics.meta import recipe
from l2o_dynamics.optimizees import get_optimizee
from l2o_dynamics.optimizers import FLOAT32_TINY, make_baseline
from l2o_dynamics.runner import meta_test
from l2o_dynamics.errors import L2OError
from cli_checks import one_line_exit_2, tree

FILE = "afile"
EVIL = "pretrained:base/../../../../tmp/x/evil"
LONG = "n" * 300  # one name longer than NAME_MAX (255 on Linux and macOS file systems)

CASES = [
    # pretrained names resolve only inside the shipped set
    (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", EVIL, "--out", "o"],
     "no pretrained L2O 'base/../../../../tmp/x/evil'; available: "),
    (["meta-train", "--init-from", EVIL, "--out", "o"], "no pretrained L2O"),
    (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint",
      "pretrained:leaky_relu/beta=0.5000001", "--out", "o"], "available: "),
    # values in range that float32 cannot hold
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "1e-320", "--out", "o"],
     "1e-320 underflows float32"),
    (["meta-train", "--meta-lr", "1e-320", "--out", "o"], "underflows float32"),
    (["meta-train", "--eta", "1e-300", "--out", "o"], "underflows float32"),
    (["meta-train", "--reg", "rescale", "--beta", "1e-40", "--out", "o"], "underflows float32"),
    # values in range whose meta-training cannot fit in memory: refused with the estimate
    (["meta-train", "--hidden", "4096", "--layers", "16", "--out", "o"], "needs at least"),
    (["meta-train", "--horizon", "1000000", "--unroll", "1000000", "--out", "o"], "needs at least"),
    (["meta-train", "--tasks", "10000", "--out", "o"], "needs at least"),
    # meta-gradient estimators: bad settings and combinations
    (["meta-train", "--estimator", "pes", "--pairs", "0", "--out", "o"], "--pairs: must be an integer in 1..100000"),
    (["meta-train", "--estimator", "pes", "--sigma", "0", "--out", "o"], "--sigma: must be a finite number"),
    (["meta-train", "--estimator", "es", "--sigma", "nan", "--out", "o"], "--sigma: must be a finite number"),
    (["meta-train", "--estimator", "full-es", "--sigma", "inf", "--out", "o"], "--sigma: must be a finite number"),
    (["meta-train", "--estimator", "reinforce", "--out", "o"], "invalid choice: 'reinforce'"),
    (["meta-train", "--recipe", "plain", "--estimator", "pes", "--unroll", "300", "--out", "o"],
     "unroll (300) must be at most horizon (200)"),
    (["meta-train", "--recipe", "plain", "--estimator", "pes", "--horizon-min", "5", "--out", "o"],
     "horizon_min (5) must be in 20..horizon (200)"),
    (["meta-train", "--estimator", "pes", "--out", "o"], "estimator pes does not support short_runs, collapse"),
    # names the file system cannot hold
    (["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--out", LONG], "at most 255 per name"),
    (["meta-train", "--out", f"d/{LONG}"], "at most 255 per name"),
    (["reproduce", "--out", LONG], "at most 255 per name"),
    (["plot", ".", "--out", f"{LONG}.png"], "at most 255 per name"),
    # Ray that is not there: one line, at once
    (["reproduce", "--out", "o", "--ray-address", "127.0.0.1:1"], "--ray-address"),
    # top-level parse errors: one prefix
    ([], "l2o-dynamics: error: the following arguments are required: COMMAND"),
]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh working directory holding one file; MNIST loading raises (no case may get
    there); the LSTM kernel mode a command sets is restored afterwards."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / FILE).write_text("not a checkpoint\n")

    def no_work(*args, **kwargs):
        raise AssertionError("validation let a bad input through to loading MNIST")

    monkeypatch.setattr(data, "load_mnist", no_work)
    monkeypatch.setattr(learned.KERNELS, "mode", learned.KERNELS.mode)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


@pytest.mark.parametrize("argv,expect", CASES, ids=[" ".join(a)[:80] for a, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(argv, expect, cwd, capsys):
    before = tree(cwd)
    assert expect in one_line_exit_2(argv, capsys)
    assert tree(cwd) == before


def test_ray_address_auto_without_a_cluster_is_one_line(cwd, capsys, monkeypatch):
    ray = pytest.importorskip("ray")

    def no_cluster(address=None, **kwargs):  # what ray.init(address="auto") raises with no cluster to find
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # hermetic: another test may have joined one
    monkeypatch.setattr(ray, "init", no_cluster)
    line = one_line_exit_2(["reproduce", "--out", "o", "--ray-address", "auto"], capsys)
    assert "(--ray-address) auto: cannot start or join Ray (ConnectionError: Could not find" in line
    assert not (cwd / "o").exists()


def test_an_unanswered_ray_address_times_out_in_one_line():
    def silent(address, timeout):  # a host that drops the packets: connect() times out
        raise TimeoutError("timed out")

    with pytest.raises(L2OError, match=r"ray_address \(--ray-address\) 10.0.0.1:6379: .*no answer within 0.5 s") as e:
        pipeline.probe_address("10.0.0.1:6379", timeout_s=0.5, connect=silent)
    assert "\n" not in str(e.value)


def _phi():
    return learned.init_phi(torch.Generator().manual_seed(0))


NET = {"hidden": 20, "layers": 2, "p": 10.0, "eta": 0.1}


# ---- pretrained names -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["base/../../../../tmp/x/evil", "../leaky_relu/beta=0", "leaky_relu/beta=0.5000001",
                                  "leaky_relu/beta=nan", "base", "leaky_relu/../sigmoid/beta=0"])
def test_a_pretrained_name_outside_the_shipped_set_is_refused_listing_the_valid_ones(name):
    with pytest.raises(L2OError, match=re.escape("available: " + ", ".join(learned.available_pretrained()))):
        learned.pretrained(name)


def test_a_pretrained_name_leading_to_a_real_checkpoint_outside_is_not_loaded(tmp_path):
    torch.save({"phi": _phi(), "net": NET}, tmp_path / "evil.pt")  # a valid L2O: only the name can stop it
    rel = os.path.relpath(tmp_path / "evil", Path(learned.PRETRAINED_DIR) / "base")
    with pytest.raises(L2OError, match="no pretrained L2O"):
        learned.l2o_from_checkpoint(f"pretrained:base/{rel}")
    with pytest.raises(L2OError, match="no pretrained L2O"):
        recipe("default", init_from=f"pretrained:base/{rel}").validate()


def test_every_pretrained_path_is_a_shipped_file():
    root = Path(learned.PRETRAINED_DIR).resolve()
    for name in learned.available_pretrained():
        path = Path(learned.pretrained(name)).resolve()  # ROOT/OPTIMIZEE/beta=B.pt or ROOT/RECIPE/OPTIMIZEE/beta=B.pt
        assert root in path.parents and len(path.relative_to(root).parts) == len(name.split("/"))
        assert path.relative_to(root).as_posix() == f"{name}.pt"
    # 0.5 and 0.50 name one file, a beta a hair off names none
    assert learned.pretrained("leaky_relu/beta=0.50") == learned.pretrained("leaky_relu/beta=0.5")


# ---- checkpoint dtypes and devices -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_checkpoint_in_another_float_dtype_loads_as_float32(dtype, tmp_path):
    stored = {k: v.to(dtype) for k, v in _phi().items()}
    torch.save({"phi": stored, "net": NET}, tmp_path / "l2o.pt")
    l2o = learned.l2o_from_checkpoint(tmp_path / "l2o.pt")
    for k, v in stored.items():  # widening is exact; float64 -> float32 is round-to-nearest
        assert l2o.phi[k].dtype == torch.float32 and torch.equal(l2o.phi[k], v.to(torch.float32))
    g = {"w": torch.randn(5, generator=torch.Generator().manual_seed(1))}
    u, _ = l2o.update(g, l2o.init(g))  # runs on float32 gradients (it raised a dtype mismatch before)
    assert u["w"].dtype == torch.float32 and bool(torch.isfinite(u["w"]).all())


@pytest.mark.parametrize("command", ["meta-test", "meta-train"])
@pytest.mark.parametrize("convert,expect", [
    (lambda v: v.to("meta"), "meta device"),
    (lambda v: v.to_sparse(), "sparse"),
    (lambda v: v.to(torch.complex64), "complex64"),
], ids=["meta device", "sparse", "complex"])
def test_a_checkpoint_without_dense_real_weights_is_refused_in_one_line(convert, expect, command, cwd, capsys):
    torch.save({"phi": {k: convert(v) for k, v in _phi().items()}, "net": NET}, cwd / "bad.pt")
    before = tree(cwd)
    argv = (["meta-test", "--optimizer", "l2o", "--optimizee", "relu", "--checkpoint", "bad.pt", "--out", "o"]
            if command == "meta-test" else ["meta-train", "--init-from", "bad.pt", "--out", "o"])
    assert expect in one_line_exit_2(argv, capsys)
    assert tree(cwd) == before


# ---- resume checkpoints ------------------------------------------------------------------------
def _resume_checkpoint(**over) -> dict:
    cfg = recipe("default")
    ck = {"config": cfg.to_dict(), "phi": _phi(), "best_phi": _phi(), "opt": {"state": {}, "param_groups": []},
          "best_opt": None, "rng": {"torch": torch.get_rng_state()}, "log": [], "epoch": 1, "meta_step": 1,
          "best_score": 1.0, "best_epoch": 0, "skipped": 0, "rollbacks": 0, "lr_scale": 1.0, "fusion": "eager"}
    return {**ck, **over}


NAN_ADAM = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([math.nan]),
                          "exp_avg_sq": torch.tensor([1.0])}}, "param_groups": []}
RESUMES = [
    ("epoch 99", dict(epoch=99), "epoch must be an integer in 0..50"),
    ("epoch -1", dict(epoch=-1), "epoch must be"),
    ("epoch 1.5", dict(epoch=1.5), "epoch must be"),
    ("lr_scale nan", dict(lr_scale=math.nan), "lr_scale must be"),
    ("lr_scale inf", dict(lr_scale=math.inf), "lr_scale must be"),
    ("NaN optimizer state", dict(opt=NAN_ADAM), "opt holds non-finite"),
    ("NaN best optimizer state", dict(best_opt=NAN_ADAM), "best_opt holds non-finite"),
    ("optimizer state a list", dict(opt=[1]), "opt is not a meta-optimizer state_dict"),
    ("best_score nan", dict(best_score=math.nan), "best_score must be"),
    ("best_score a string", dict(best_score="1.0"), "best_score must be"),
    ("meta_step -1", dict(meta_step=-1), "meta_step must be"),
    ("skipped a string", dict(skipped="3"), "skipped must be"),
    ("best_epoch after epoch", dict(best_epoch=4), "best_epoch 4 is not an epoch done"),
    ("compiled, resumed eager", dict(fusion="compile"), "written with the compile LSTM cell"),
]


@pytest.mark.parametrize("over,expect", [r[1:] for r in RESUMES], ids=[r[0] for r in RESUMES])
def test_a_resume_checkpoint_with_impossible_state_is_refused_before_any_work(over, expect, cwd, capsys):
    run = cwd / "run"
    run.mkdir()
    torch.save(_resume_checkpoint(**over), run / "checkpoint.pt")
    before = {p: p.read_bytes() for p in run.iterdir()}
    line = one_line_exit_2(["meta-train", "--resume", "--fusion", "eager", "--out", "run"], capsys)
    assert expect in line and "remove it" in line or "--fusion compile" in line, line
    assert {p: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("mode,recorded,after", [("auto", "eager", "eager"), ("auto", "compile", "auto"),
                                                ("eager", "eager", "eager"), ("compile", "compile", "compile"),
                                                ("eager", None, "eager")])
def test_a_resumed_run_takes_the_recorded_lstm_cell_under_auto(mode, recorded, after, monkeypatch):
    monkeypatch.setattr(learned.KERNELS, "mode", mode)
    monkeypatch.setattr(learned.KERNELS, "_failed", set())
    learned.adopt_fusion(recorded, "cpu")
    assert learned.KERNELS.mode == after


def test_a_checkpoint_meta_train_wrote_passes_every_check(tmp_path, synthetic, monkeypatch):
    monkeypatch.setattr(learned.KERNELS, "mode", "eager")
    cfg = recipe("default", epochs=2, runs=1, horizon=5, unroll=5, val_runs=1, batch_size=16)
    meta.meta_train(cfg, tmp_path, data=synthetic, progress=False, stop_after_epochs=1)
    ck = meta.read_checkpoint(tmp_path / "checkpoint.pt", cfg)
    assert (ck["epoch"], ck["meta_step"], ck["fusion"]) == (1, 1, "eager")


# ---- plot on damaged metrics ---------------------------------------------------------------------
HEADER = "experiment,optimizee,optimizer,beta,seed,step,metric,value\n"
ROW = "meta-test,relu,sgd,,0,{step},train_loss,{value}\n"
DAMAGED = [
    ("short row", HEADER + ROW.format(step=0, value=1.0) + "meta-test,relu,sgd,,0\n", "line 3 has 5 fields"),
    ("long row", HEADER + ROW.format(step=0, value=1.0).strip() + ",extra\n", "has 9 fields"),
    ("text seed", HEADER + "meta-test,relu,sgd,,zero,0,train_loss,1.0\n", "seed 'zero' is not a non-negative integer"),
    ("text value", HEADER + ROW.format(step=0, value="big"), "value 'big' is not a number"),
    ("text beta", HEADER + "meta-test,relu,sgd,b,0,0,train_loss,1.0\n", "beta 'b' is not a number"),
    ("step 1e30", HEADER + ROW.format(step="1e30", value=1.0), "step '1e30' is not a non-negative integer"),
    ("step 1e30 as digits", HEADER + ROW.format(step=10**30, value=1.0), "is not a non-negative integer"),
    ("negative step", HEADER + ROW.format(step=-1, value=1.0), "is not a non-negative integer"),
    ("NUL bytes", HEADER + "meta-test,relu,sgd,,0,0,train_lo\0ss,1.0\n", "NUL bytes"),
    ("binary", b"\x89PNG\r\n\x1a\n\xff\xfe\x80", "not UTF-8"),
    ("no header", ROW.format(step=0, value=1.0), "not an l2o-dynamics metrics.csv"),
    ("a directory", None, "not a regular file"),
    ("a FIFO", "fifo", "not a regular file"),
]


@pytest.mark.parametrize("content,expect", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_plot_on_a_damaged_metrics_csv_is_one_line(content, expect, cwd, capsys):
    run = cwd / "run"
    run.mkdir()
    target = run / "metrics.csv"
    if content is None:
        target.mkdir()
    elif content == "fifo":
        os.mkfifo(target)  # opening it for reading would block until a writer comes
    else:
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = tree(cwd)
    assert expect in one_line_exit_2(["plot", "run"], capsys)
    assert tree(cwd) == before


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_a_device_is_never_read_as_metrics(path):
    with pytest.raises(L2OError, match="is not a regular file"):
        results.Table.read(path)


def test_a_metrics_file_over_the_size_limit_is_refused_unread(tmp_path):
    (tmp_path / "metrics.csv").write_text(HEADER + ROW.format(step=0, value=1.0) * 10)
    with pytest.raises(L2OError, match=r"more than any metrics.csv \(100\)"):
        results._read_text(tmp_path / "metrics.csv", limit=100)


def test_a_valid_metrics_csv_still_reads_with_nan_and_inf_values(tmp_path):
    (tmp_path / "metrics.csv").write_text(HEADER + ROW.format(step=0, value="nan") + ROW.format(step=1, value="inf")
                                          + "meta-test,relu,l2o,0.5,3,2,test_loss,-0.25\n")
    t = results.Table.read(tmp_path / "metrics.csv")
    assert t.cols["step"].tolist() == [0, 1, 2] and t.cols["seed"].tolist() == [0, 0, 3]
    assert np.isnan(t.cols["value"][0]) and t.cols["value"][1] == math.inf and t.cols["value"][2] == -0.25
    assert np.isnan(t.cols["beta"][0]) and t.cols["beta"][2] == 0.5


# ---- a damaged job store ----------------------------------------------------------------------
class NoExecutor:
    def run(self, pending, store, on_start, on_done):
        raise AssertionError("a damaged store let the run start")


def _finished(store: pipeline.Store, job, files: dict[str, bytes]) -> None:
    d = store.path(job.key)
    d.mkdir(parents=True)
    for name, blob in files.items():
        (d / name).write_bytes(blob)


def _meta_test_job():
    return next(j for j in build_jobs(get_profile("smoke"), ("symmetry-breaking",)) if j.kind == "meta-test")


@pytest.mark.parametrize("files,expect", [
    ({"job.json": b'{"key": "K", "wall_time_s": 1.0}', "config.json": b"{}"}, "metrics.csv missing"),
    ({"job.json": b"\x00garbage", "metrics.csv": HEADER.encode(), "config.json": b"{}"}, "job.json is unreadable"),
    ({"job.json": b"[1, 2]", "metrics.csv": HEADER.encode(), "config.json": b"{}"},
     "job.json is not this job's record"),
    ({"job.json": b'{"key": "K", "wall_time_s": 1.0}', "metrics.csv": b"oops\n", "config.json": b"{}"},
     "metrics.csv has no tidy header"),
], ids=["no metrics", "garbage job.json", "job.json a list", "metrics without header"])
def test_a_damaged_finished_job_stops_the_run_in_one_line(files, expect, tmp_path):
    job = _meta_test_job()
    store = pipeline.Store(tmp_path / "jobs")
    _finished(store, job, {k: v.replace(b'"K"', f'"{job.key}"'.encode()) for k, v in files.items()})
    with pytest.raises(L2OError, match=f"finished job .*is damaged \\({expect}") as e:
        pipeline.run_jobs([job], store, NoExecutor(), progress=False)
    assert "\n" not in str(e.value) and f"remove {store.path(job.key)}" in str(e.value)


# ---- a full disk -------------------------------------------------------------------------------
ROWS = [("meta-test", "relu", "sgd", "", 0, 0, "train_loss", 2.5),
        ("meta-test", "relu", "sgd", "", 0, 1, "train_loss", 1.5)]


def _full_disk_at(full: Path, write_run=results.write_run):
    """results.write_run, failing as a full disk does for the directory `full`."""
    def write(out, *args, **kwargs):
        if Path(out).absolute() == full:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "metrics.csv"))
        return write_run(out, *args, **kwargs)
    return write


def test_a_full_disk_keeps_the_computed_results_and_says_where(tmp_path):
    out, rescue = tmp_path / "out", tmp_path / "elsewhere"
    rescue.mkdir()
    with pytest.raises(L2OError, match="No space left on device.*saved in .*l2o-dynamics-rescued-") as e:
        results.save_run(out, {"kind": "meta-test"}, ROWS, write=_full_disk_at(out), rescue_dir=rescue)
    (saved,) = rescue.iterdir()
    assert str(saved) in str(e.value) and "\n" not in str(e.value)
    assert (saved / "metrics.csv").read_text() == results.format_rows(ROWS)


def test_a_full_disk_everywhere_says_so_and_leaves_no_empty_directory(tmp_path):
    def nowhere(out, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(L2OError, match="could not be saved elsewhere either"):
        results.save_run(tmp_path / "out", {}, ROWS, write=nowhere, rescue_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_meta_test_on_a_full_disk_exits_2_with_one_line_naming_the_rescue(cwd, capsys, monkeypatch, synthetic):
    rescue = cwd / "tmp"
    rescue.mkdir()
    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: synthetic)
    monkeypatch.setattr(results, "write_run", _full_disk_at((cwd / "o").absolute()))
    monkeypatch.setattr("tempfile.tempdir", str(rescue))
    line = one_line_exit_2(["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "0.1", "--steps", "3",
                             "--seeds", "1", "--batch-size", "16", "--no-progress", "--out", "o"], capsys)
    (saved,) = rescue.iterdir()
    assert "No space left on device" in line and str(saved) in line
    assert results.Table.read(saved / "metrics.csv").unique("metric") == ["diverged", "test_acc", "test_loss",
                                                                          "train_acc", "train_loss"]
    assert not (cwd / "o").exists()


# ---- memory ------------------------------------------------------------------------------------
def test_the_memory_estimate_adds_up_the_documented_terms():
    cfg = recipe("plain", optimizee="relu", hidden=3, layers=1, tasks=2, unroll=5, horizon=5, batch_size=4)
    # s = 4 bytes; n = 15910 (relu); P = 4H(2) + 4H(H) + 4H + 4H + H + 1 = 24 + 36 + 12 + 12 + 3 + 1 = 88
    # unroll: K s (R (I + 9H) + 4H (I + H) + 8 B n) = 5 * 4 * (31820 * 29 + 12 * 5 + 8 * 2 * 15910)
    # data: 60000 * 784 + 2 B batch 784 s = 47,040,000 + 2 * 2 * 4 * 784 * 4
    assert meta.memory_estimate(cfg) == {"meta_params": 7 * 88 * 4, "unroll": 5 * 4 * (31820 * 29 + 60 + 254560),
                                         "data": 47_040_000 + 50_176}


def test_a_config_that_needs_more_than_is_available_is_refused_with_the_estimate():
    cfg = recipe("default")
    need = sum(meta.memory_estimate(cfg).values())
    meta.check_fits(cfg, need)
    meta.check_fits(cfg, None)  # unknown: not checked
    with pytest.raises(L2OError, match=r"needs at least 0\.\d+ GiB \(meta_params .* but cpu has 0\.\d+ GiB available"):
        meta.check_fits(cfg, need - 1)


# ---- data --------------------------------------------------------------------------------------
def _small_cache(tmp_path: Path) -> Path:
    g = np.random.default_rng(0)
    arrays = {"train_x": g.integers(0, 256, (20, 784), dtype=np.uint8),
              "train_y": g.integers(0, 10, 20).astype(np.uint8),
              "test_x": g.integers(0, 256, (10, 784), dtype=np.uint8), "test_y": g.integers(0, 10, 10).astype(np.uint8)}
    path = tmp_path / "cache" / data.CACHE_NAME
    data._write_cache(path, arrays, "test", data.content_digest(arrays))
    return path


def test_data_fetch_with_a_garbage_idx_dir_fails_although_a_cache_exists(tmp_path, monkeypatch, capsys):
    cache = _small_cache(tmp_path)
    monkeypatch.setenv("L2O_DYNAMICS_CACHE", str(cache.parent))
    garbage = tmp_path / "idx"
    garbage.mkdir()
    for stem in data.IDX_FILES.values():
        (garbage / stem).write_bytes(b"garbage!" * 4)
    before = cache.read_bytes()
    line = one_line_exit_2(["data", "fetch", "--idx-dir", str(garbage)], capsys)
    assert "bad IDX magic number" in line and "--idx-dir" in line
    assert cache.read_bytes() == before and sorted(p.name for p in cache.parent.iterdir()) == [data.CACHE_NAME]


def test_a_failing_idx_dir_prints_no_progress_line_before_its_error(tmp_path, capsys):
    with pytest.raises(L2OError, match="idx"):
        data.load_mnist(tmp_path / "nowhere", cache=tmp_path / "cache", verbose=True)
    assert capsys.readouterr().err == ""


# ---- Ctrl-C while starting ---------------------------------------------------------------------
def test_ctrl_c_while_importing_prints_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    # as the console script does: import the CLI (torch with it, seconds), then call main
    # (the package itself is imported first: a signal inside Python's import machinery,
    # before the CLI module runs, is outside what the CLI can catch)
    code = ("import sys, l2o_dynamics; sys.stderr.write('ready\\n'); sys.stderr.flush(); "
            "from l2o_dynamics.cli import main; sys.exit(main(['data', 'info']))")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr.readline() == "ready\n"
    time.sleep(0.2)  # inside the CLI's imports (torch takes about a second)
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    p.wait(timeout=120)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    assert p.returncode in (0, 130), (p.returncode, err)  # 0 only if it had finished before the signal


# ---- the Python API ----------------------------------------------------------------------------
def test_a_nan_update_has_nan_relative_deviation_and_a_zero_update_zero():
    model = get_optimizee("leaky_relu")
    theta = model.init(torch.Generator().manual_seed(0))
    nan = {k: torch.full_like(v, math.nan) for k, v in theta.items()}
    zero = {k: torch.zeros_like(v) for k, v in theta.items()}
    for kind in ("rescale", "translation"):
        assert math.isnan(float(symmetry.measures(kind, nan, theta, model.structure)["rel"]))
        assert float(symmetry.measures(kind, zero, theta, model.structure)["rel"]) == 0.0  # 0/0 := 0


@pytest.mark.parametrize("eta", [math.nan, -5.0, math.inf, 0.0])
def test_l2o_optimizer_refuses_a_param_group_eta_outside_its_range(eta):
    l2o = learned.l2o_from_checkpoint("pretrained:leaky_relu")
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(L2OError, match=r"param_groups\[0\]: eta must be a finite number in \(0, 10\]"):
        learned.L2OOptimizer([{"params": [w], "eta": eta}], l2o)
    opt = learned.L2OOptimizer([w], l2o)
    opt.param_groups[0]["eta"] = eta  # as a scheduler would
    w.grad = torch.ones(3)
    with pytest.raises(L2OError, match=r"param_groups\[0\]: eta"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(3))


@pytest.mark.parametrize("lr,expect", [(math.nan, "lr must be"), (-1.0, "lr must be"), (0.0, "lr must be"),
                                       (1e-320, "lr 1e-320 underflows float32"),
                                       (torch.tensor([0.1, math.nan]), r"lr\[1\] must be")])
def test_make_baseline_refuses_a_learning_rate_outside_its_range(lr, expect):
    with pytest.raises(L2OError, match=expect) as e:
        make_baseline("sgd", lr=lr)
    assert "--" not in str(e.value)
    assert make_baseline("adam", lr=FLOAT32_TINY).lr == FLOAT32_TINY


@pytest.mark.parametrize("kwargs,expect", [(dict(seeds=[]), "seeds must be a non-empty sequence"),
                                           (dict(seeds=3), "seeds must be a non-empty sequence"),
                                           (dict(steps=0), "steps must be"),
                                           (dict(eval_every=0), "eval_every must be")])
def test_meta_test_refuses_bad_arguments_by_their_python_names(kwargs, expect, synthetic):
    args = {"seeds": [0], "steps": 2, "eval_every": 1, **kwargs}
    with pytest.raises(L2OError, match=expect) as e:
        meta_test(make_baseline("sgd", lr=0.1), "relu", synthetic.split("train"), args["seeds"], args["steps"],
                  eval_set=synthetic.split("test"), eval_every=args["eval_every"])
    assert "--" not in str(e.value)


@pytest.mark.parametrize("over,expect", [(dict(beta=0.5), "beta=0.5 needs reg"),
                                         (dict(reg="twist", beta=1.0), "unknown reg 'twist'"),
                                         (dict(reg="rescale", reg_measure="x", beta=1.0), "unknown reg_measure"),
                                         (dict(meta_lr=1e-320), "meta_lr 1e-320 underflows float32")])
def test_meta_train_config_errors_name_the_python_argument(over, expect):
    with pytest.raises(L2OError, match=expect) as e:
        recipe("default", **over).validate()
    assert "--" not in str(e.value)
