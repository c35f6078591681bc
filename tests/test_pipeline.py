"""The `reproduce` pipeline end to end on the smoke profile: outputs, re-runs that
redo nothing, resume after a kill, a process pool, and a real local Ray instance."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2o_dynamics import pipeline
from l2o_dynamics.experiments import build_jobs, get_profile
from l2o_dynamics.errors import L2OError
from l2o_dynamics.files import MARKER
from l2o_dynamics.results import COLUMNS, Table


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("smoke")
    started = time.time()
    summary = pipeline.reproduce("smoke", out, progress=False, fusion="eager", echo=lambda s: None)
    return out, summary, time.time() - started


def test_smoke_profile_produces_every_output(smoke):
    out, summary, seconds = smoke
    jobs = build_jobs(get_profile("smoke"))
    assert all((out / "jobs" / j.key / "job.json").is_file() for j in jobs)
    t = Table.read(out / "metrics.csv")
    assert (out / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert set(t.unique("experiment")) == {"symmetry-breaking", "regularization", "generalization", "noise",
                                           "meta-train"}
    assert set(t.where(experiment="regularization").unique("optimizer")) == {"sgd", "adam", "lion", "l2o"}
    assert {"l2o(leaky_relu)", "l2o(bn_relu)"} <= set(t.where(experiment="generalization").unique("optimizer"))
    for name in ("symmetry_breaking.png", "symmetry_breaking_rel.png", "symmetry_breaking_published.png",
                 "regularization.png", "noise.png", "meta_training.png", "generalization.png"):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
    report = (out / "report.md").read_text()
    assert "## Findings" in report and "## Jobs" in report and "## Environment" in report
    for f in summary["findings"]:
        assert f.claim in report
    assert {f.key for f in summary["findings"]} >= {
        "deviation_rescale_total", "deviation_scale_rel", "deviation_rescale_timing", "deviation_scale_timing",
        "regularization_slowdown", "regularization_unseen", "alpha_update_vs_baselines",
        "alpha_update_vs_grad", "noise_filtering", "alpha_update_vs_baselines_std",
        "alpha_update_vs_baselines_pub", "noise_filtering_pub", "cov_max_eig",
        "l2o_fast_start", "deviation_rescale_total_published", "deviation_scale_timing_published",
        "alpha_update_vs_baselines_pub_published"}
    html = (out / "report.html").read_text()
    assert "<img src='figures/noise.png'" in html and "<table>" in html
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["profile"]["name"] == "smoke" and len(cfg["jobs"]) == len(jobs)
    assert "Findings of the study" in summary["text"]


def test_the_report_lists_every_searched_learning_rate_and_says_the_smoke_search_is_shortened(smoke):
    from l2o_dynamics.runner import LR_GRID

    out, _, _ = smoke
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_search"]["horizon"] == 20 and cfg["lr_search"]["runs"] == 1  # smoke's, not the study's
    assert cfg["lr_search"]["study"] == {"horizon": 500, "runs": 3} and not cfg["lr_search"]["as_study"]
    report = (out / "report.md").read_text()
    section = report.split("## Baselines' learning rates", 1)[1].split("\n## ", 1)[0]
    assert "shortened from the study's 500 steps x 3 runs" in section
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in section.splitlines()
            if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header[:5] == ["optimizer", "optimizee", "horizon", "runs", "chosen lr"]
    assert header[6:] == [f"{lr:g}" for lr in LR_GRID]
    searches = [j for j in build_jobs(get_profile("smoke")) if j.kind == "lr-search"]
    assert len(body) == len(searches) == 6  # one per baseline and optimizee, shared by every experiment
    for job in searches:
        found = json.loads((out / "jobs" / job.key / "result.json").read_text())
        (row,) = [r for r in body if r[:2] == [job.config["optimizer"], job.config["optimizee"]]]
        assert row[2:5] == ["20", "1", f"{found['lr']:g}"]
        chosen = row[6 + list(LR_GRID).index(found["lr"])]
        assert chosen == f"**{found['scores'][repr(found['lr'])]:.4g}**"
    assert "2 meta-test seeds (report seeds 100-101" in report


def test_profiles_meta_test_on_report_seeds_and_search_lrs_by_the_studys_protocol():
    from l2o_dynamics.seeds import seed_family

    for name in ("quick", "paper"):
        jobs = build_jobs(get_profile(name))
        tests = [j for j in jobs if j.kind == "meta-test"]
        assert {seed_family(s) for j in tests for s in j.config["seeds"]} == {"report"}, name
        searches = {j.key: j for j in jobs if j.kind == "lr-search"}
        assert {(j.config["horizon"], tuple(j.config["seeds"])) for j in searches.values()} == \
            {(500, (10_000, 10_001, 10_002))}, name
        for j in tests:  # every experiment's baseline, whatever its horizon, uses its optimizee's one search
            if j.config["optimizer"] != "l2o":
                src = searches[j.config["source"]].config
                assert (src["optimizer"], src["optimizee"]) == (j.config["optimizer"], j.config["optimizee"])
        assert get_profile(name).lr_protocol()["as_study"], name
    assert get_profile("quick").seeds == (100, 101, 102) and get_profile("paper").seeds == (100, 101, 102, 103, 104)


def test_explicit_seeds_replace_the_meta_test_seeds_and_nothing_else():
    from l2o_dynamics.errors import L2OError

    quick = get_profile("quick")
    given = pipeline.override(quick, seeds=[7, 9])
    before, after = build_jobs(quick), build_jobs(given)
    assert {j.config["seeds"].__repr__() for j in after if j.kind == "meta-test"} == {"[7, 9]"}
    # the other jobs (searches, L2Os) keep their keys
    assert {j.key for j in before if j.kind != "meta-test"} == {j.key for j in after if j.kind != "meta-test"}
    assert given.unseen_seeds == 2  # quick's generalisation table: its 3 seeds, at most the 2 given
    res = pipeline.reproduce(quick, "unused", seeds=[7, 9], dry_run=True, echo=lambda s: None)
    assert {tuple(j.config["seeds"]) for j in res["jobs"] if j.kind == "meta-test"} == {(7, 9)}
    with pytest.raises(L2OError, match="seed 7 is given twice"):
        pipeline.override(quick, seeds=[7, 7])


def test_every_run_of_reproduce_records_the_data_digest(smoke, mnist):
    out, _, _ = smoke
    configs = [json.loads(p.read_text()) for p in (out / "jobs").glob("*/config.json")]
    runs = [c for c in configs if c.get("kind") in ("meta-test", "meta-train")]
    assert {c["kind"] for c in runs} == {"meta-test", "meta-train"}
    assert all(c["data_digest"] == mnist.digest for c in runs)
    assert json.loads((out / "config.json").read_text())["data_digests"] == [mnist.digest]


def test_rerun_redoes_nothing(smoke, monkeypatch):
    out, _, _ = smoke

    def boom(*a, **k):
        raise AssertionError("a finished job was run again")

    monkeypatch.setattr(pipeline, "run_job", boom)
    before = (out / "metrics.csv").read_bytes()
    pipeline.reproduce("smoke", out, progress=False, echo=lambda s: None)
    assert (out / "metrics.csv").read_bytes() == before


def test_dry_run_lists_the_graph(smoke, capsys):
    out, _, _ = smoke
    res = pipeline.reproduce("paper", out / "paper", dry_run=True)
    text = capsys.readouterr().out
    assert "meta-train L2O on leaky_relu (beta=0.1)" in text and "estimated time left" in text
    assert len(res["done"]) == 0 and not (out / "paper").exists()


def _same_metrics(a: Path, b: Path, label: str, rtol: float = 1e-4) -> None:
    """Equal up to float rounding, which differs between processes (thread count, MKL's
    alignment-dependent kernels). Tail indices get 5%: an L2O's update noise has
    coordinates that vary only by rounding (exact centring zeroes them, at a relative
    threshold), and the pooled estimators' mean of log|x| feels them at the ~1% level."""
    import numpy as np

    ta, tb = Table.read(a), Table.read(b)
    assert len(ta) == len(tb), label
    for col in ("experiment", "optimizee", "optimizer", "metric", "seed", "step"):
        assert (ta.cols[col] == tb.cols[col]).all(), (label, col)
    metric = ta.cols["metric"].astype(str)
    alpha = np.char.startswith(metric, "alpha_")
    # The study's estimator on the float32 centring as published ('_published') keeps every
    # value, so coordinates whose centred update is float32 rounding (~1e-9, or exactly 0 in
    # another process) enter its mean of log(|x| + eps) at -21 or -36: it does not reproduce
    # across processes (README, Deviations and caveats). Checked finite here; its math is
    # tested in test_noise_estimators.py and test_noise.py.
    pub = np.char.endswith(metric, "_published") & alpha
    np.testing.assert_allclose(ta.cols["value"][~alpha], tb.cols["value"][~alpha], rtol=rtol, atol=1e-6,
                               err_msg=label)
    np.testing.assert_allclose(ta.cols["value"][alpha & ~pub], tb.cols["value"][alpha & ~pub], rtol=0.05,
                               err_msg=label)
    assert np.isfinite(ta.cols["value"][pub]).all() and np.isfinite(tb.cols["value"][pub]).all(), label


def _default_sigint() -> None:
    """SIGINT back to its default in the child: a shell's background job (pytest started with
    `&`) ignores it, children inherit that, and the Ctrl-C below would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args, **kw):
    env = {**os.environ, "L2O_DYNAMICS_FUSION": "eager", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "l2o_dynamics", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


def _wait_for_jobs(out: Path, n: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob("jobs/*/job.json"))) < n:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)


def _finished(out: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in out.glob("jobs/*/job.json")}


def test_interrupted_and_killed_reproduce_resumes_without_redoing_finished_jobs(tmp_path, mnist):
    out = tmp_path / "out"
    args = ("experiment", "symmetry-breaking", "--scale", "smoke", "--out", str(out), "--no-progress")
    total = len(build_jobs(get_profile("smoke"), ("symmetry-breaking",)))
    # Ctrl-C: a clean stop, exit 130, nothing half-written
    proc = _cli(*args, start_new_session=True)
    _wait_for_jobs(out, 4, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    first = _finished(out)
    # SIGKILL mid-graph: no chance to clean up
    proc = _cli(*args, start_new_session=True)
    _wait_for_jobs(out, len(first) + 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    second = _finished(out)
    assert len(first) < len(second) < total, "the kill should land mid-graph"
    assert not (out / "report.md").exists()
    again = _cli(*args)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    after = _finished(out)
    assert len(after) == total
    for key, text in second.items():
        assert after[key] == text, f"{key} was redone"
    assert not [p for p in (out / "jobs").iterdir() if p.name.startswith(".") and p.name not in (".work", MARKER)]
    assert (out / "report.md").exists() and "Findings of the study" in stdout


def test_process_pool_gives_the_same_results(smoke, tmp_path):
    out, _, _ = smoke
    pool = tmp_path / "pool"
    pipeline.reproduce("smoke", pool, experiments=("symmetry-breaking",), workers=2, progress=False,
                       fusion="eager", echo=lambda s: None)
    # workers run 1 thread each, the fixture 2: float reduction order differs, so compare the
    # baselines (smooth in the data) with a tolerance and check the L2O jobs ran
    for job in build_jobs(get_profile("smoke"), ("symmetry-breaking",)):
        assert (pool / "jobs" / job.key / "job.json").is_file(), job.label
        if job.kind == "meta-test" and job.config["optimizer"] in ("sgd", "adam"):
            _same_metrics(out / "jobs" / job.key / "metrics.csv", pool / "jobs" / job.key / "metrics.csv",
                          job.label)


def test_ray_executor_runs_the_graph_on_a_local_ray_instance(smoke, tmp_path):
    ray = pytest.importorskip("ray", reason="make test installs ray; this skip only hits bare installs")
    out, _, _ = smoke
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dest = tmp_path / "ray"
        # two CPUs per task, like the in-process fixture: equal up to MKL's rounding, which
        # depends on memory alignment and so can differ between processes in the last bits
        summary = pipeline.reproduce("smoke", dest, experiments=("noise",), ray_address="local",
                                     threads=2, progress=False, fusion="eager", echo=lambda s: None)
        assert (dest / "report.md").exists() and summary["findings"]
    finally:
        ray.shutdown()
    for job in build_jobs(get_profile("smoke"), ("noise",)):
        info = json.loads((dest / "jobs" / job.key / "job.json").read_text())
        assert info["key"] == job.key
        if (out / "jobs" / job.key / "metrics.csv").exists():
            _same_metrics(out / "jobs" / job.key / "metrics.csv", dest / "jobs" / job.key / "metrics.csv",
                          job.label, rtol=1e-5)
        if job.kind == "lr-search":
            assert json.loads((dest / "jobs" / job.key / "result.json").read_text())["lr"] == \
                json.loads((out / "jobs" / job.key / "result.json").read_text())["lr"]


def test_pretrained_profiles_analyse_the_shipped_set_and_train_one_demo_l2o():
    import dataclasses
    import hashlib

    from l2o_dynamics.experiments import run_job
    from l2o_dynamics.learned import pretrained

    profile = dataclasses.replace(get_profile("smoke"), l2os="pretrained")
    jobs = build_jobs(profile)
    shipped = [j for j in jobs if j.kind == "pretrained"]
    assert {j.config["name"] for j in shipped} == {"leaky_relu/beta=0", "leaky_relu/beta=0.5",
                                                   "bn_relu/beta=0", "bn_relu/beta=0.5"}
    trains = [j for j in jobs if j.kind == "meta-train"]
    assert len(trains) == 1 and trains[0].config["optimizee"] == "leaky_relu" and not trains[0].config["beta"]
    # every L2O meta-test reads a shipped L2O, never the demo meta-training
    sources = {j.config["source"] for j in jobs if j.kind == "meta-test" and j.config["optimizer"] == "l2o"}
    assert sources == {j.key for j in shipped}
    files = run_job(shipped[0], {})
    blob = Path(pretrained(shipped[0].config["name"])).read_bytes()
    assert files["l2o.pt"] == blob and hashlib.sha256(blob).hexdigest() == shipped[0].config["sha256"]
    assert get_profile("quick").l2os == "pretrained" and get_profile("paper").l2os == "train"


def test_meta_seeds_meta_train_and_meta_test_one_l2o_per_seed(tmp_path, mnist):
    import dataclasses

    one = dataclasses.replace(get_profile("smoke"), l2os="train")
    three = dataclasses.replace(one, meta_seeds=3)
    jobs1, jobs3 = build_jobs(one, ("symmetry-breaking",)), build_jobs(three, ("symmetry-breaking",))
    assert {j.key for j in jobs1} <= {j.key for j in jobs3}  # seed 0's jobs are the one-seed jobs
    trains = {j.key: j for j in jobs3 if j.kind == "meta-train"}
    assert sorted(j.config["seed"] for j in trains.values()) == [0, 0, 1, 1, 2, 2]  # leaky_relu, bn_relu
    tests = [j for j in jobs3 if j.kind == "meta-test" and j.config["optimizer"] == "l2o"]
    assert len(tests) == 6 and all(trains[j.config["source"]].config["seed"] == j.config.get("meta_seed", 0)
                                   for j in tests)
    shipped = dataclasses.replace(three, l2os="pretrained")  # one shipped L2O per setting
    assert sum(j.kind == "pretrained" for j in build_jobs(shipped, ("symmetry-breaking",))) == 2

    summary = pipeline.reproduce(three, tmp_path, experiments=("symmetry-breaking",), progress=False,
                                 fusion="eager", echo=lambda s: None)
    t = Table.read(tmp_path / "metrics.csv")
    assert {"l2o", "l2o@m1", "l2o@m2"} <= set(t.unique("optimizer"))
    (f,) = [f for f in summary["findings"] if f.key == "deviation_rescale_total"]
    assert len(f.stats["log10(L2O / sgd)"]) == 3  # one statistic per meta-trained L2O
    assert "3 meta-trained L2Os per setting" in (tmp_path / "report.md").read_text()


def test_a_further_recipes_shipped_l2os_are_analysed_beside_the_default_ones(shipped, tmp_path, mnist):
    import dataclasses

    from l2o_dynamics.experiments import missing_pretrained

    for o in ("leaky_relu", "bn_relu"):
        for b in ("0", "0.5"):
            shipped(f"{o}/beta={b}", seed=0)
    shipped("authors/leaky_relu/beta=0", seed=1)  # bn_relu's and the penalised ones: not shipped
    base = dataclasses.replace(get_profile("smoke"), l2os="pretrained")
    both = dataclasses.replace(base, extra_recipes=("published",))  # the alias names the authors recipe
    jobs0, jobs = build_jobs(base), build_jobs(both)
    assert {j.key for j in jobs0} < {j.key for j in jobs}  # the default L2Os' jobs (and stores) are reused
    assert {j.config["name"] for j in jobs if j.kind == "pretrained"} == \
        {j.config["name"] for j in jobs0 if j.kind == "pretrained"} | {"authors/leaky_relu/beta=0"}
    extra = [j for j in jobs if j.kind == "meta-test" and j.config.get("recipe") == "authors"]
    assert sorted((j.config["experiment"], j.config["optimizee"]) for j in extra) == [
        ("generalization", "relu"), ("generalization", "sigmoid"), ("noise", "leaky_relu"),
        ("regularization", "leaky_relu"), ("symmetry-breaking", "leaky_relu")]
    assert missing_pretrained(both) == ["pretrained:authors/bn_relu/beta=0", "pretrained:authors/bn_relu/beta=0.5",
                                        "pretrained:authors/leaky_relu/beta=0.5"]

    summary = pipeline.reproduce(both, tmp_path / "run", experiments=("symmetry-breaking",), progress=False,
                                 fusion="eager", echo=lambda s: None)
    t = Table.read(tmp_path / "run" / "metrics.csv").where(experiment="symmetry-breaking")
    assert set(t.unique("optimizer")) == {"sgd", "adam", "lion", "l2o", "l2o[authors]"}
    assert t.where(optimizer="l2o[authors]").unique("optimizee") == ["leaky_relu"]
    by_recipe = {r: {f.key: f for f in fs} for r, fs in summary["findings_by_recipe"].items()}
    assert list(by_recipe) == ["default", "authors"]
    main, authors = (by_recipe[r]["deviation_rescale_total"] for r in ("default", "authors"))
    assert authors.stats["sgd"] == main.stats["sgd"] and authors.stats["l2o"] != main.stats["l2o"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| held here? L2O (default recipe) | held here? L2O [authors] (authors recipe) |" in report
    assert "**L2O [authors]**: the authors recipe's shipped set, pretrained:authors/OPTIMIZEE/beta=B" in report
    assert "Not shipped (yet), so those settings have the main recipe's L2O only: " \
           "pretrained:authors/bn_relu/beta=0." in report
    assert "- (no L2O of this recipe here)" in report  # the scale panel, bn_relu
    assert "| leaky_relu / rescale | L2O [authors] | total |" in report


def test_a_further_recipes_l2os_are_meta_trained_by_that_recipe_and_labelled_with_it(tmp_path, mnist):
    import dataclasses

    from l2o_dynamics.experiments import run_job
    from l2o_dynamics.meta import MetaTrainConfig

    tiny = dict(epochs=1, runs=1, horizon=10, unroll=5, val_runs=1)
    prof = dataclasses.replace(get_profile("smoke"), extra_recipes=("authors",), extra_meta={"authors": tiny})
    jobs = build_jobs(prof, ("symmetry-breaking",))
    assert {j.key for j in build_jobs(dataclasses.replace(prof, extra_recipes=()), ("symmetry-breaking",))} < \
        {j.key for j in jobs}
    trains = [j for j in jobs if j.kind == "meta-train" and j.config.get("recipe") == "authors"]
    assert sorted(j.config["optimizee"] for j in trains) == ["bn_relu", "leaky_relu"]
    for j in trains:  # the authors' settings, the profile's budget for them
        c = j.config
        assert (c["loss_index"], c["log_eps"], c["select"], c["clip_grad"], c["rollback"], c["collapse"]) == \
            ("current", 1e-8, "train-runs", None, None, None)
        assert {k: c[k] for k in tiny} == tiny
    # the paper profile: the authors recipe at its own budget, the study's 10,000 meta-steps
    paper = [j for j in build_jobs(get_profile("paper"), ("symmetry-breaking",))
             if j.kind == "meta-train" and j.config.get("recipe") == "authors"]
    assert len(paper) == 2 * 3 and {MetaTrainConfig.from_dict(j.config).total_meta_steps() for j in paper} == {10_000}

    train = next(j for j in trains if j.config["optimizee"] == "leaky_relu")
    test = next(j for j in jobs if j.kind == "meta-test" and j.config["source"] == train.key)
    files = run_job(train, {})
    (tmp_path / "train.csv").write_bytes(files["metrics.csv"])
    (tmp_path / "test.csv").write_bytes(run_job(test, {train.key: files})["metrics.csv"])
    assert Table.read(tmp_path / "train.csv").unique("optimizer") == ["l2o[authors]"]
    assert Table.read(tmp_path / "test.csv").unique("optimizer") == ["l2o[authors]"]


@pytest.mark.parametrize("extra,l2os,msg", [(("nope",), "train", "unknown recipe 'nope'"),
                                            (("default",), "pretrained", "repeats the main recipe"),
                                            (("authors", "published"), "train", "repeats")])
def test_bad_extra_recipes_are_refused(extra, l2os, msg):
    import dataclasses

    from l2o_dynamics.errors import L2OError

    with pytest.raises(L2OError, match=msg):
        build_jobs(dataclasses.replace(get_profile("smoke"), l2os=l2os, extra_recipes=extra))


def test_reproduce_meta_trains_its_l2os_by_the_recipe_and_estimator_given(tmp_path, mnist):
    """`reproduce --recipe plain --meta estimator=pes ...`: every main L2O of the run, the
    penalised ones included, is meta-trained by PES, and the report says so."""
    import dataclasses

    prof = dataclasses.replace(get_profile("smoke"), l2os="train")
    meta = {"estimator": "pes", "pairs": 2, "sigma": 0.02}
    summary = pipeline.reproduce(prof, tmp_path, experiments=("regularization",), recipe="plain", meta=meta,
                                 progress=False, fusion="eager", echo=lambda s: None)
    trains = [j for j in build_jobs(pipeline.override(prof, recipe="plain", meta=meta), ("regularization",))
              if j.kind == "meta-train"]
    assert len(trains) == 4 and all(j.config["estimator"] == "pes" and j.config["pairs"] == 2 for j in trains)
    for job in trains:
        metrics = Table.read(tmp_path / "jobs" / job.key / "metrics.csv").unique("metric")
        assert ("reg_loss" in metrics) == bool(job.config["beta"]), job.label  # the penalty in PES's objective
    assert "meta-gradients by pes (2 antithetic pairs, sigma 0.02, truncations of 5)" in \
        (tmp_path / "report.md").read_text()
    assert summary["findings"]


@pytest.mark.parametrize("kw, msg", [
    (dict(meta={"estimator": "pes"}), "profile smoke analyses the shipped ones; add --l2os train"),
    (dict(l2os="train", meta={"seed": 3}), "--meta seed: set by the pipeline per job; valid: batch_size"),
    (dict(l2os="train", meta={"estimatr": "pes"}), "--meta estimatr: not a meta-training setting"),
    (dict(l2os="train", meta={"estimator": "pes"}, recipe="default"), "estimator pes does not support short_runs"),
    (dict(l2os="train", recipe="plain", meta={"estimator": "pes", "pairs": 0}), "pairs must be an integer"),
])
def test_bad_meta_training_overrides_are_refused_before_anything_runs(kw, msg):
    import dataclasses

    prof = dataclasses.replace(get_profile("smoke"), l2os="pretrained")
    with pytest.raises(L2OError) as e:
        pipeline.override(prof, **kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_the_mlp_family_goes_through_every_experiment_beside_the_lstm(tmp_path, mnist):
    """`reproduce --l2o-family lstm,mlp`: the MLP L2Os (recipe mlp, the profile's budget) are
    meta-tested by every experiment and get a findings column of their own."""
    import dataclasses

    prof = pipeline.override(dataclasses.replace(get_profile("smoke"), l2os="train"), families=("lstm", "mlp"))
    trains = [j for j in build_jobs(prof) if j.kind == "meta-train" and j.config.get("recipe") == "mlp"]
    assert len(trains) == 4 and all(j.config["family"] == "mlp" and j.config["epochs"] == 2 for j in trains)
    summary = pipeline.reproduce(prof, tmp_path, progress=False, fusion="eager", echo=lambda s: None)
    t = Table.read(tmp_path / "metrics.csv")
    for experiment in ("symmetry-breaking", "regularization", "generalization", "noise"):
        assert any(o.startswith("l2o[mlp]") for o in t.where(experiment=experiment).unique("optimizer")), experiment
    assert set(summary["findings_by_recipe"]) == {"plain", "mlp"}
    report = (tmp_path / "report.md").read_text()
    assert "held here? L2O [mlp] (mlp recipe)" in report and "the mlp learned optimizer" in report
    with pytest.raises(L2OError, match="valid: lstm or lstm,mlp"):
        pipeline.override(prof, families=("mlp",))
