"""Nothing of the user's is ever deleted or overwritten (issue 16, data loss items 1-3).

Each test plants the trap a user (or an accident) could leave, runs what the issue ran,
and asserts that the victim is untouched, byte for byte. The tool deletes only what it can
prove it made (files.py): names it generates, inside directories that carry its marker."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from l2o_dynamics import cli, pipeline, procs
from l2o_dynamics.errors import L2OError
from l2o_dynamics.experiments import Job, run_job
from l2o_dynamics.files import ASIDE_PREFIX, LOCK_NAME, MARKER, owner, run_dir
from l2o_dynamics.locks import locked_dir
from l2o_dynamics.meta import recipe
from l2o_dynamics.results import prepare_out_dir

SRC = str(Path(pipeline.__file__).resolve().parents[1])
PRECIOUS = b"the user's own bytes\n"
META_TEST = ["meta-test", "--optimizer", "sgd", "--optimizee", "relu", "--lr", "0.1", "--steps", "2",
             "--seeds", "1", "--eval-every", "1", "--no-progress"]
META_TRAIN = ["meta-train", "--optimizee", "leaky_relu", "--epochs", "1", "--runs", "1", "--horizon", "10",
              "--unroll", "5", "--val-runs", "1", "--fusion", "eager", "--no-progress"]
SMOKE = ["experiment", "symmetry-breaking", "--scale", "smoke", "--fusion", "eager", "--no-progress"]


def _tree(root: Path) -> dict[str, object]:
    """Every entry under `root` (links not followed): file bytes, 'dir', or 'link -> target'."""
    out: dict[str, object] = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = f"link -> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def _plant(root: Path, *files: str) -> None:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(PRECIOUS)


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_bytes(PRECIOUS)
    return v


def _exit_2(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], (rc, err)
    return err[0]


def _ok(argv, capsys) -> None:
    rc = cli.main(argv)
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()


# ---- item 1: --store and the sweeps --------------------------------------------------------------------
def test_a_store_on_a_users_directory_is_refused_and_its_hidden_dirs_and_tmp_files_stay(tmp_path, mnist, capsys):
    home = tmp_path / "home"
    _plant(home, ".ssh/id_ed25519", ".git/HEAD", ".config/app.conf", "projects/.draft.tmp",
           ".notes.1a2b3c4d.tmp", "projects/.y.l2o-1a2b3c4d.tmp")
    before = _tree(home)
    err = _exit_2([*SMOKE, "--out", str(tmp_path / "x"), "--store", str(home)], capsys)
    assert "is not a job store" in err
    assert _tree(home) == before and not (tmp_path / "x").exists()


def test_a_stores_sweep_removes_its_own_leftovers_and_keeps_dot_dirs_and_tmp_files_put_there(tmp_path):
    root = tmp_path / "jobs"
    store = pipeline.Store(root)
    _plant(root, ".ssh/id_ed25519", ".cache/x.tmp", ".work/k/.draft.tmp", "notes/.x.tmp")
    kept = _tree(root)
    own = [root / ".meta-test-0123456789ab.l2o-1a2b3c4d", root / ".work" / "k" / ".checkpoint.pt.l2o-5e6f7a8b.tmp"]
    own[0].mkdir()
    own[1].write_bytes(b"")
    store.sweep()
    assert _tree(root) == kept, "only the names the store and atomic writes generate are gone"


def test_a_refused_run_deletes_no_tmp_file_under_its_out(tmp_path, mnist, capsys):
    user = tmp_path / "d"
    _plant(user, "deep/.x.tmp", "deep/.y.l2o-1a2b3c4d.tmp")
    before = _tree(user)
    assert "not made by l2o-dynamics" in _exit_2([*META_TEST, "--out", str(user)], capsys)
    assert _tree(user) == before
    ours = tmp_path / "ours"  # the tool's own run dir: a refused re-run sweeps nothing either
    _ok([*META_TEST, "--out", str(ours)], capsys)
    _plant(ours, "deep/.x.tmp", ".metrics.csv.l2o-1a2b3c4d.tmp")
    before = _tree(ours)
    assert "not empty; pass --overwrite" in _exit_2([*META_TEST, "--out", str(ours)], capsys)
    assert _tree(ours) == before


def test_overwrite_drops_the_old_contents_only_once_the_new_run_has_finished(tmp_path, mnist, capsys):
    out = tmp_path / "out"
    _ok([*META_TEST, "--out", str(out)], capsys)
    _plant(out, "notes.tmp", ".metrics.csv.l2o-1a2b3c4d.tmp")
    _ok([*META_TEST, "--out", str(out), "--overwrite"], capsys)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", "metrics.csv"]


# ---- item 2: links are never written through -----------------------------------------------------------
@pytest.mark.parametrize("argv", [META_TEST, ["meta-test", "--optimizer", "l2o", "--optimizee", "relu"]],
                         ids=["a run", "a run refused as bad input"])
def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(argv, tmp_path, mnist, capsys):
    victim, out = _victim(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    assert "is a symbolic link" in _exit_2([*argv, "--out", str(out)], capsys)
    assert victim.read_bytes() == PRECIOUS and (out / LOCK_NAME).is_symlink()


@pytest.mark.parametrize("plant", ["hard link", "foreign file"])
def test_a_lock_file_the_tool_did_not_write_is_refused_untouched(plant, tmp_path):
    victim, out = _victim(tmp_path), tmp_path / "out"
    out.mkdir()
    if plant == "hard link":
        os.link(victim, out / LOCK_NAME)
    else:
        (out / LOCK_NAME).write_bytes(PRECIOUS)
    with pytest.raises(L2OError, match="not a lock file l2o-dynamics made|not written by l2o-dynamics"):
        with locked_dir(out, "run"):
            pass
    assert victim.read_bytes() == (out / LOCK_NAME).read_bytes() == PRECIOUS


def test_a_planted_write_test_or_marker_link_is_replaced_as_a_link_never_written_through(tmp_path, mnist, capsys):
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    _ok([*META_TEST, "--out", str(out)], capsys)
    (out / ".write-test").symlink_to(victim)  # the probe name of earlier versions
    _ok([*META_TEST, "--out", str(out), "--overwrite"], capsys)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / MARKER).symlink_to(victim)
    prepare_out_dir(fresh)  # the API's claim: the marker is renamed into place over the link
    assert victim.read_bytes() == PRECIOUS and not (fresh / MARKER).is_symlink() and owner(fresh)


def test_overwrite_of_a_run_dir_holding_a_link_to_a_directory_removes_the_link_only(tmp_path, mnist, capsys):
    users = tmp_path / "users"
    _plant(users, "a.txt", "sub/b.txt")
    before = _tree(users)
    out = tmp_path / "run"
    _ok([*META_TRAIN, "--out", str(out)], capsys)
    (out / "data").symlink_to(users, target_is_directory=True)
    _ok([*META_TRAIN, "--out", str(out), "--overwrite"], capsys)
    assert _tree(users) == before and not os.path.lexists(out / "data")
    assert {"l2o.pt", "metrics.csv", "config.json"} <= {p.name for p in out.iterdir()}


def test_overwrite_of_a_users_dir_holding_a_link_is_refused_and_deletes_nothing(tmp_path, mnist, capsys):
    users = tmp_path / "users"
    _plant(users, "a.txt")
    out = tmp_path / "d"
    _plant(out, "paper.tex")
    (out / "data").symlink_to(users, target_is_directory=True)
    before = _tree(tmp_path)
    assert "not made by l2o-dynamics" in _exit_2([*META_TRAIN, "--out", str(out), "--overwrite"], capsys)
    assert _tree(tmp_path) == before


def test_a_link_to_a_directory_inside_a_continued_run_dir_is_refused(tmp_path):
    users = tmp_path / "users"
    _plant(users, "noise.png")
    out = tmp_path / "out"
    with locked_dir(out, "first"), run_dir(out, "reproduce"):
        pass
    (out / "figures").symlink_to(users, target_is_directory=True)  # reproduce would write its figures there
    with locked_dir(out, "again"):
        with pytest.raises(L2OError, match="symbolic link to a directory"):
            with run_dir(out, "reproduce", resume=True):
                pass
    assert (users / "noise.png").read_bytes() == PRECIOUS


def test_a_link_planted_in_the_store_is_removed_never_followed(tmp_path):
    users = tmp_path / "users"
    _plant(users, "job.json.bak")
    store = pipeline.Store(tmp_path / "jobs")
    (tmp_path / "jobs" / "meta-test-0123456789ab").symlink_to(users, target_is_directory=True)
    store.write("meta-test-0123456789ab", {"job.json": b'{"wall_time_s": 1}'})
    assert (users / "job.json.bak").read_bytes() == PRECIOUS and sorted(p.name for p in users.iterdir()) == [
        "job.json.bak"]
    assert store.done("meta-test-0123456789ab")
    (tmp_path / "jobs" / ".work").symlink_to(users, target_is_directory=True)
    with pytest.raises(L2OError, match="not a directory the tool made"):
        store.workdir("k")
    assert sorted(p.name for p in users.iterdir()) == ["job.json.bak"]


# ---- item 3: finished results are replaced only with --overwrite ---------------------------------------
def test_resume_of_a_finished_meta_training_is_refused_and_keeps_its_results(tmp_path, mnist, capsys):
    out = tmp_path / "run"
    _ok([*META_TRAIN, "--out", str(out)], capsys)
    before = _tree(out)
    assert "finished meta-train" in _exit_2([*META_TRAIN, "--out", str(out), "--resume"], capsys)
    assert _tree(out) == before


@pytest.mark.parametrize("argv", [SMOKE, ["reproduce", "--profile", "smoke", "--fusion", "eager", "--no-progress"]],
                         ids=["experiment", "reproduce"])
def test_experiment_or_reproduce_at_a_finished_meta_test_dir_is_refused(argv, tmp_path, mnist, capsys):
    out = tmp_path / "mt"
    _ok([*META_TEST, "--out", str(out)], capsys)
    before = _tree(out)
    assert "holds a meta-test run" in _exit_2([*argv, "--out", str(out)], capsys)
    assert _tree(out) == before


def test_an_interrupted_overwrite_moves_the_old_contents_back(tmp_path):
    out = tmp_path / "out"
    with run_dir(out, "meta-test"):
        _plant(out, "metrics.csv", "config.json", "figures/loss.png")
    before = _tree(out)
    with pytest.raises(KeyboardInterrupt):
        with run_dir(out, "meta-train", overwrite=True):
            assert sorted(p.name for p in out.iterdir() if p.name != MARKER)[0].startswith(ASIDE_PREFIX)
            _plant(out, "checkpoint.pt")  # the new run's first file
            raise KeyboardInterrupt
    assert _tree(out) == before and owner(out)["kind"] == "meta-test"


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "L2O_DYNAMICS_FUSION": "eager", "OMP_NUM_THREADS": "1"}
    # -X faulthandler: a SIGABRT (see _communicate) prints where every thread is
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", code], env=env, **kw)


def _communicate(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """proc.communicate(timeout), or a failure that shows where the process was stuck."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"{what} within {timeout:g} s; its stderr and threads:\n{err}")


def _cli(*args, **kw) -> subprocess.Popen:
    # SIGINT back to its default: a shell's background job (pytest started with `&`) ignores it,
    # and children inherit that
    return _python(f"import sys; from l2o_dynamics.cli import main; sys.exit(main({list(args)!r}))",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.05)


def test_ctrl_c_during_meta_train_overwrite_leaves_the_finished_results_in_place(tmp_path, mnist, capsys):
    out = tmp_path / "run"
    _ok([*META_TRAIN, "--out", str(out)], capsys)
    before = _tree(out)
    long = [a if a != "1" or i != META_TRAIN.index("--epochs") + 1 else "500" for i, a in enumerate(META_TRAIN)]
    proc = _cli(*long, "--out", str(out), "--overwrite")
    try:
        _wait(lambda: proc.poll() is not None or any(p.name.startswith(ASIDE_PREFIX) for p in out.iterdir()),
              120, "the old contents were never moved aside")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = _communicate(proc, 60, "no exit after Ctrl-C")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert _tree(out) == before


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
def test_a_store_inside_a_running_reproduces_out_is_refused(tmp_path, mnist, capsys):
    a = tmp_path / "A"
    holder = _cli(*SMOKE, "--out", str(a), start_new_session=True)
    try:
        _wait(lambda: holder.poll() is not None or (a / "jobs" / LOCK_NAME).exists(), 120, "the run never started")
        assert holder.poll() is None, holder.communicate()[1]
        b = tmp_path / "B"
        assert "is in use by pid" in _exit_2([*SMOKE, "--out", str(b), "--store", str(a / "jobs")], capsys)
        assert "lies inside" in _exit_2([*SMOKE, "--out", str(b), "--store", str(a / "jobs" / "x")], capsys)
        assert "lies inside" in _exit_2([*META_TEST, "--out", str(a / "jobs" / "y")], capsys)
        assert not b.exists() and not (a / "jobs" / "x").exists() and not (a / "jobs" / "y").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


# ---- the rest of the class: Windows, temporary directories ---------------------------------------------
def test_without_posix_locks_the_lock_fails_with_one_line_naming_the_limitation(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    with pytest.raises(L2OError, match="needs POSIX flock") as e:
        with locked_dir(tmp_path / "o", "run"):
            pass
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_off_linux_the_parent_death_signal_is_skipped_for_the_portable_watch(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "fcntl", None)
    assert procs._set_parent_death_signal() is False  # die_with_parent then polls the parent pid


def test_a_meta_training_job_with_a_work_dir_makes_no_temporary_directory(tmp_path, mnist, monkeypatch):
    scratch = tmp_path / "tmp"  # missing: making a temporary directory there fails at once
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = recipe("default", epochs=1, runs=1, horizon=10, unroll=5, val_runs=1).validate().to_dict()
    work = tmp_path / "work"
    work.mkdir()
    files = run_job(Job("meta-train", cfg, "tiny"), {}, work)
    assert {"l2o.pt", "config.json", "metrics.csv"} <= set(files) and (work / "checkpoint.pt").is_file()
    assert not list(scratch.glob("l2o-*"))  # (torch may keep its own caches there)
    assert json.loads(files["config.json"])["kind"] == "meta-train"
