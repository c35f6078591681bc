"""The estimators' bias/variance diagnostic (estimator_diagnostic.py, `l2o-dynamics estimators`):
its numbers on constructed estimates whose answer is known, its exact reference against finite
differences and against the loss the estimators run, and its bad inputs."""
import math

import pytest
import torch

from l2o_dynamics import data
from l2o_dynamics import estimator_diagnostic as D
from l2o_dynamics import estimators as E
from l2o_dynamics.learned import L2O, init_phi
from l2o_dynamics.optimizees import Optimizee
from cli_checks import one_line_exit_2, tree
from tolerance import reduction_atol

F64 = torch.float64
TINY = Optimizee("tiny", (3,), "leaky_relu", in_features=4, classes=3)  # 27 parameters
Z = 5.0  # a deviation beyond Z standard errors is a real difference


def _gradients(r, d, seed=0):
    return torch.randn(r, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- summarize on constructed estimates ---------------------------------------------------------
def test_an_estimate_equal_to_the_reference_has_cosine_one_and_no_bias_or_error():
    refs = _gradients(6, 40)
    s = D.summarize(refs.clone(), refs)
    assert s["cosine"] == pytest.approx(1.0, abs=reduction_atol(F64, 40, 1.0))
    assert s["cosine_se"] == pytest.approx(0.0, abs=reduction_atol(F64, 40, 1.0))
    assert s["rel_bias2"] == 0.0 and s["rel_error"] == 0.0


def test_a_deterministic_estimate_has_zero_variance_and_the_bias_of_its_offset():
    refs = _gradients(5, 30)
    fixed = _gradients(1, 30, seed=1)[0]
    s = D.summarize(fixed.expand(5, 30).clone(), refs)
    assert s["variance"] == 0.0 and s["variance_median"] == 0.0 and s["rel_variance"] == 0.0
    # error_r = fixed - ref_r: |mean error|^2 - (summed variance of the errors) / R, over mean |ref|^2
    err = fixed - refs
    expected = ((err.mean(0) ** 2).sum() - err.var(0).sum() / 5) / (refs ** 2).sum(1).mean()
    assert s["rel_bias2"] == pytest.approx(float(expected), rel=1e-12)
    assert s["cosines"] == pytest.approx([D.cosine(fixed, g) for g in refs], rel=1e-12)


def test_a_noisy_estimate_has_the_variance_of_its_noise_and_the_squared_bias_of_its_offset():
    r, d, s2 = 400, 200, 0.09
    g = _gradients(1, d)[0]
    refs = g.expand(r, d).clone()  # one task: the reference is the same every draw
    offset = 0.3 * _gradients(1, d, seed=2)[0]
    noise = math.sqrt(s2) * _gradients(r, d, seed=3)
    s = D.summarize(refs + offset + noise, refs)
    # the mean of d sample variances of N(0, s2) noise: sd s2 sqrt(2 / ((R - 1) d))
    assert abs(s["variance"] - s2) < Z * s2 * math.sqrt(2 / ((r - 1) * d))
    # |mean error|^2 corrected for the noise left in the mean: var 4 s2 |b|^2 / R + 2 d s2^2 / R^2
    sd = math.sqrt(4 * s2 * float(offset @ offset) / r + 2 * d * s2 ** 2 / r ** 2)
    norm2 = float(g @ g)
    assert abs(s["rel_bias2"] * norm2 - float(offset @ offset)) < Z * sd
    unbiased = D.summarize(refs + noise, refs)["rel_bias2"] * norm2  # no offset: zero within the noise
    assert abs(unbiased) < Z * math.sqrt(2 * d) * s2 / r
    assert float((noise.mean(0) ** 2).sum()) > Z * math.sqrt(2 * d) * s2 / r  # the uncorrected |mean error|^2 is not


# ---- the exact reference -------------------------------------------------------------------------
def _task(steps, seed=11):
    g = torch.Generator().manual_seed(seed)
    params = TINY.init(g, dtype=F64)
    batches = [(torch.rand(8, 4, generator=g, dtype=F64) * 2 - 1, torch.randint(0, 3, (8,), generator=g))
               for _ in range(steps + 1)]
    return params, batches


def _phi(hidden=2, layers=2):
    return init_phi(torch.Generator().manual_seed(0), hidden, layers, F64)


def test_the_reference_is_the_derivative_of_the_whole_runs_summed_loss():
    phi, (params, batches) = _phi(), _task(6)
    net = L2O(phi, hidden=2, layers=2)
    grad, _ = D.full_run_gradient(net, phi, TINY, params, batches)
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5), dtype=F64) for k, v in phi.items()}
    h = 1e-6
    j = [D.full_run_gradient(net, {k: phi[k] + sgn * h * direction[k] for k in phi}, TINY, params, batches)[1]
         for sgn in (1, -1)]
    slope = sum(float((grad[k] * direction[k]).sum()) for k in phi)
    assert (j[0] - j[1]) / (2 * h) == pytest.approx(slope, rel=1e-6)


def test_the_reference_differentiates_the_summed_loss_the_estimators_run_on_the_same_task():
    phi, (params, batches) = _phi(), _task(6)
    net = L2O(phi, hidden=2, layers=2)
    _, total = D.full_run_gradient(net, phi, TINY, params, batches)
    s = E.Settings(estimator="es", unroll=6, horizon=6, offsets=False, pairs=1, meta_loss="sum")
    es = E.make(s, net, TINY, lambda b, run: (params, iter(batches)), torch.Generator().manual_seed(0), F64)
    assert es.estimate(phi).meta_loss == pytest.approx(total, rel=reduction_atol(F64, 6 * 27, 1.0))


def test_with_little_noise_pes_and_full_es_point_along_the_reference_at_its_scale_where_tbptt_does_not():
    g = torch.Generator().manual_seed(3)
    train = (torch.randint(0, 256, (64, 4), generator=g, dtype=torch.uint8), torch.randint(0, 3, (64,), generator=g))
    phi = _phi(layers=1)
    cfg = D.DiagnosticConfig(unrolls=(2, 3, 6), horizon=6, draws=2, pairs=400, sigma=1e-4, batch_size=8)
    out = D.diagnose({"x": L2O(phi, hidden=2, layers=1)}, TINY, train, cfg, dtype=F64)
    rows = {(r["estimator"], r["unroll"]): r for r in out["phis"]["x"]["rows"]}
    assert set(rows) == {("tbptt", 2), ("tbptt", 3), ("tbptt", 6), ("es", 2), ("es", 3), ("pes", 2), ("pes", 3),
                         ("full-es", 6)}
    for key in [("pes", 2), ("pes", 3), ("full-es", 6)]:  # unbiased for the whole run's gradient
        assert min(rows[key]["cosines"]) > 0.9, (key, rows[key])
        assert rows[key]["rel_error"] < 0.5, (key, rows[key])  # full-es: its grad of the mean loss, times T
    # truncated, and first order: on one of the two tasks far from it
    assert min(rows[("tbptt", 2)]["cosines"]) < 0.5 and rows[("tbptt", 2)]["rel_error"] > 0.8
    assert "| x | pes | 2 |" in D.table(out)


# ---- resume after a kill ---------------------------------------------------------------------------
def _small_run():
    g = torch.Generator().manual_seed(3)
    train = (torch.randint(0, 256, (64, 4), generator=g, dtype=torch.uint8), torch.randint(0, 3, (64,), generator=g))
    cfg = D.DiagnosticConfig(unrolls=(2, 3), horizon=6, draws=2, pairs=2, sigma=1e-2, batch_size=8)
    l2os = {"a": L2O(_phi(layers=1), hidden=2, layers=1), "b": L2O(_phi(hidden=3, layers=1), hidden=3, layers=1)}
    return train, cfg, l2os


def _numbers(result):
    """The result without its clocks (a resumed run times only the parts it ran again)."""
    if isinstance(result, dict):
        return {k: _numbers(v) for k, v in result.items() if "seconds" not in k}
    if isinstance(result, list):
        return [_numbers(v) for v in result]
    return result


@pytest.mark.parametrize("stop_after", [1, 4, 9])  # saves: after the first reference, mid-draw, in phi 'b'
def test_a_diagnostic_killed_after_any_save_resumes_to_the_same_numbers_without_redoing_work(
        tmp_path, monkeypatch, stop_after):
    train, cfg, l2os = _small_run()
    whole = D.diagnose(l2os, TINY, train, cfg, dtype=F64)
    fp = D.fingerprint(l2os, TINY, cfg, F64, torch.device("cpu"), "eager")
    ckpt, saves = D.Checkpoint(tmp_path, fp), []

    def save_then_die(done):
        ckpt.save(done)
        saves.append(1)
        if len(saves) == stop_after:
            raise KeyboardInterrupt  # a kill right after this write: the file holds exactly this

    with pytest.raises(KeyboardInterrupt):
        D.diagnose(l2os, TINY, train, cfg, dtype=F64, save=save_then_die)
    done = D.Checkpoint(tmp_path, fp).load()
    assert D.done_count(done) == stop_after
    estimates_done = stop_after - sum(len(recs) for recs in done.values())
    calls = []
    real = D.run_estimate
    monkeypatch.setattr(D, "run_estimate", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = D.diagnose(l2os, TINY, train, cfg, dtype=F64, done=done, save=ckpt.save)
    assert _numbers(resumed) == _numbers(whole)
    assert len(calls) == len(l2os) * cfg.draws * len(cfg.cells()) - estimates_done


def test_a_checkpoint_of_other_settings_is_refused_unless_discarded_and_a_foreign_file_never(tmp_path):
    train, cfg, l2os = _small_run()
    fp = D.fingerprint(l2os, TINY, cfg, F64, torch.device("cpu"), "eager")
    D.Checkpoint(tmp_path, fp).save({"a": {}})
    other = D.fingerprint(l2os, TINY, D.DiagnosticConfig(unrolls=(2,), horizon=6, draws=2), F64,
                          torch.device("cpu"), "eager")
    with pytest.raises(D.L2OError, match=r"other settings \(config differ\).*--overwrite"):
        D.Checkpoint(tmp_path, other).load()
    assert D.Checkpoint(tmp_path, other).load(discard=True) == {}
    assert D.Checkpoint(tmp_path, fp).load() == {"a": {}}
    l2os["a"].phi["out.bias"] += 1e-12  # another phi: its bytes differ
    changed = D.fingerprint(l2os, TINY, cfg, F64, torch.device("cpu"), "eager")
    with pytest.raises(D.L2OError, match=r"\(l2os differ\)"):
        D.Checkpoint(tmp_path, changed).load()
    for foreign in (b"not a checkpoint", None):
        path = tmp_path / D.CHECKPOINT
        path.unlink()
        if foreign is None:
            (tmp_path / "elsewhere").write_bytes(b"x")
            path.symlink_to(tmp_path / "elsewhere")
        else:
            path.write_bytes(foreign)
        for discard in (False, True):
            ckpt = D.Checkpoint(tmp_path, fp)
            with pytest.raises(D.L2OError, match="move it away"):
                ckpt.load(discard=discard)
            ckpt.remove()  # neither loaded nor written by it: left alone
        assert path.read_bytes() == (foreign or b"x")


# ---- bad inputs ------------------------------------------------------------------------------------
@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh working directory holding one file; MNIST loading raises (no case may get there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a checkpoint\n")

    def no_work(*args, **kwargs):
        raise AssertionError("validation let a bad input through to loading MNIST")

    monkeypatch.setattr(data, "load_mnist", no_work)
    return tmp_path


CASES = [
    (["--draws", "1"], "--draws: must be an integer in 2..1000"),
    (["--unroll", "30"], "each a divisor of the horizon (100)"),
    (["--unroll", "0"], "--unroll"),
    (["--unroll", "20,20"], "each once"),
    (["--horizon", "0"], "--horizon"),
    (["--estimators", "sgd"], "expected distinct names from tbptt, es, pes, full-es"),
    (["--estimators", "pes,pes"], "expected distinct names"),
    (["--estimators", "pes", "--unroll", "100"], "nothing to measure"),
    (["--pairs", "0"], "--pairs"),
    (["--sigma", "0"], "--sigma"),
    (["--sigma", "nan"], "--sigma"),
    (["--batch-size", "0"], "--batch-size"),
    (["--l2o", "afile"], "cannot read checkpoint"),
    (["--l2o", "pretrained:nope"], "available:"),
    (["--l2o", "untrained", "--l2o", "untrained"], "each L2O once"),
    (["--device", "tpu"], "valid: cpu"),
    (["--optimizee", "nope"], "invalid choice"),
    (["--horizon", "10000", "--unroll", "10"], "lower --horizon"),  # the reference's graph: ~600 GiB
]


@pytest.mark.parametrize("argv,expect", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(argv, expect, cwd, capsys):
    before = tree(cwd)
    line = one_line_exit_2(["estimators", *argv, "--out", "o"], capsys)
    assert expect in line
    assert tree(cwd) == before


def test_a_checkpoint_of_another_diagnostic_in_out_is_refused_and_kept(cwd, capsys):
    (cwd / "o").mkdir()
    torch.save({"kind": D.CHECKPOINT_KIND, "fingerprint": {"config": {}}, "done": {}}, cwd / "o" / D.CHECKPOINT)
    before = (cwd / "o" / D.CHECKPOINT).read_bytes()
    line = one_line_exit_2(["estimators", "--out", "o"], capsys)
    assert "other settings" in line and "--overwrite" in line
    assert (cwd / "o" / D.CHECKPOINT).read_bytes() == before and tree(cwd / "o") == {D.CHECKPOINT}


def test_an_earlier_diagnostic_is_kept_without_overwrite(cwd, capsys):
    (cwd / "o").mkdir()
    (cwd / "o" / "estimators.json").write_text("{}")
    line = one_line_exit_2(["estimators", "--out", "o"], capsys)
    assert "--overwrite" in line
    assert (cwd / "o" / "estimators.json").read_text() == "{}"


def test_a_file_that_is_not_a_diagnostic_is_refused_by_the_figure_in_one_line(tmp_path):
    from l2o_dynamics.errors import L2OError
    from l2o_dynamics.plotting import estimator_figure

    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(L2OError, match="not an estimator diagnostic"):
        estimator_figure(tmp_path / "x.json", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_only_draws_whose_exact_gradient_rounding_does_not_turn_count_as_well_conditioned():
    ref = {"grad_norm": [1.0, 2.0, 3.0], "cosine_float64": [0.9999, -0.7, 0.99]}
    row = {"cosines": [0.5, -0.9, 0.7]}
    assert D.conditioned_draws(ref) == [0, 2]
    assert D.conditioned_cosine(row, ref) == pytest.approx(0.6, rel=1e-15)
    assert math.isnan(D.conditioned_cosine(row, {**ref, "cosine_float64": [0.5, 0.5, 0.5]}))
    assert D.conditioned_draws({"grad_norm": [1.0, 2.0], "cosine_float64": []}) == [0, 1]  # a float64 run


def test_the_command_killed_mid_run_resumes_to_the_same_json_and_leaves_no_checkpoint(
        tmp_path, monkeypatch, mnist, capsys):
    import json

    from l2o_dynamics import cli

    monkeypatch.chdir(tmp_path)
    argv = ["estimators", "--l2o", "untrained", "--horizon", "2", "--unroll", "1", "--draws", "2", "--pairs", "1",
            "--estimators", "tbptt,pes", "--fusion", "eager", "--no-progress"]
    assert cli.main([*argv, "--out", "whole"]) == 0
    real, saves = D.Checkpoint.save, []

    def save_then_die(self, done):
        real(self, done)
        saves.append(1)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(D.Checkpoint, "save", save_then_die)
    assert cli.main([*argv, "--out", "cut"]) == 130
    assert tree(tmp_path / "cut") == {D.CHECKPOINT}
    monkeypatch.setattr(D.Checkpoint, "save", real)
    capsys.readouterr()
    assert cli.main([*argv, "--out", "cut"]) == 0
    assert "3 references and estimates already done" in capsys.readouterr().out
    assert tree(tmp_path / "cut") == set(cli.ESTIMATOR_FILES)
    whole, cut = (json.loads((tmp_path / d / "estimators.json").read_text()) for d in ("whole", "cut"))
    assert _numbers(cut) == _numbers(whole)
