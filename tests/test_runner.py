import json

import numpy as np
import pytest
import torch

from l2o_dynamics import runner
from l2o_dynamics.data import Batcher
from l2o_dynamics.learned import L2O, init_phi
from l2o_dynamics.mlp_lopt import MLPL2O, init_mlp_phi
from l2o_dynamics.optimizees import ZOO
from l2o_dynamics.optimizers import SGD, Adam
from l2o_dynamics.runner import init_params, meta_test, search_lr
from l2o_dynamics.errors import L2OError
from l2o_dynamics.seeds import generator


def _losses(log):
    return np.array([v for m, _, v in log.entries if m == "train_loss"])


def test_same_seed_same_run_different_seeds_differ_in_init_and_data(synthetic):
    train = synthetic.split("train")
    a = meta_test(Adam(lr=1e-2), "leaky_relu", train, [0, 1], 10)
    b = meta_test(Adam(lr=1e-2), "leaky_relu", train, [0, 1], 10)
    np.testing.assert_array_equal(_losses(a), _losses(b))
    assert not np.allclose(_losses(a)[:, 0], _losses(a)[:, 1])
    p = init_params(ZOO["leaky_relu"], [0, 1])
    assert not torch.equal(p["fc1.weight"][0], p["fc1.weight"][1])
    i0 = Batcher(*train, seed=0).next_indices()
    i1 = Batcher(*train, seed=1).next_indices()
    assert not torch.equal(i0, i1)


@pytest.mark.parametrize("make", [lambda: SGD(lr=0.1), lambda: L2O(init_phi(generator("phi"))),
                                  lambda: MLPL2O(init_mlp_phi(generator("phi")), step_mult=0.01)],
                         ids=["sgd", "l2o", "mlp_l2o"])
def test_batched_seeds_equal_separate_runs(make, synthetic):
    train = synthetic.split("train")
    together = _losses(meta_test(make(), "bn_relu", train, [4, 7], 8))
    for j, seed in enumerate([4, 7]):
        alone = _losses(meta_test(make(), "bn_relu", train, [seed], 8))[:, 0]
        np.testing.assert_allclose(together[:, j], alone, rtol=1e-5, atol=1e-6)


def test_logs_train_every_step_and_test_every_k(synthetic):
    log = meta_test(Adam(lr=1e-2), "relu", synthetic.split("train"), [0, 1], 12,
                    eval_set=synthetic.split("test"), eval_every=5)
    steps = lambda m: sorted({s for mm, s, _ in log.entries if mm == m})  # noqa: E731
    assert steps("train_loss") == list(range(12)) and steps("train_acc") == list(range(12))
    assert steps("test_loss") == [0, 5, 10, 12] and steps("test_acc") == [0, 5, 10, 12]
    first, last = [v for m, s, v in log.entries if m == "test_loss" and s in (0, 12)]
    assert (np.asarray(last) < np.asarray(first)).all()
    with pytest.raises(L2OError, match="positive"):
        meta_test(Adam(), "relu", synthetic.split("train"), [0], 0)


def test_lr_search_picks_the_best_rate_on_the_validation_split_and_caches(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("L2O_DYNAMICS_CACHE", str(tmp_path))
    seen = []
    real = runner.meta_test

    def spy(opt, model, train, *a, **k):
        seen.append(train[0].data_ptr())
        return real(opt, model, train, *a, **k)

    monkeypatch.setattr(runner, "meta_test", spy)
    grid = (1e-4, 1e-2, 0.1, 30.0)
    found = search_lr("adam", "leaky_relu", synthetic, 15, grid=grid, seeds=(1, 2))
    assert seen == [synthetic.split("val")[0].data_ptr()]
    assert found.scores[30.0] > found.scores[found.lr] and found.scores[1e-4] > found.scores[found.lr]
    assert found.lr == min(found.scores, key=found.scores.get)
    # each rate's score equals a separate run of that rate
    alone = real(Adam(lr=found.lr), "leaky_relu", synthetic.split("val"), [1, 2], 15)
    assert found.scores[found.lr] == pytest.approx(alone.total("train_loss").mean(), rel=1e-5)
    files = list((tmp_path / "lr_search").glob("adam-leaky_relu-15-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["lr"] == found.lr
    again = search_lr("adam", "leaky_relu", synthetic, 15, grid=grid, seeds=(1, 2))
    assert again.cached and again.lr == found.lr and len(seen) == 1
    assert found.to_dict()["seeds"] == again.to_dict()["seeds"] == [1, 2]  # the report's "runs"


def test_a_diverging_run_is_flagged_and_warned_about(synthetic):
    rates = torch.tensor([0.1, 1e30])  # one rate per seed: seed 0 trains, seed 1 blows up
    with pytest.warns(UserWarning, match="1 of 2 runs of sgd on relu diverged"):
        log = meta_test(SGD(lr=rates), "relu", synthetic.split("train"), [0, 1], 6)
    losses = log.curve("train_loss")  # (T, S), the independent evidence
    assert np.isfinite(losses[:, 0]).all() and not np.isfinite(losses[:, 1]).all()
    assert log.curve("diverged").tolist() == [[0.0, 1.0]]
    assert {s for m, s, _ in log.entries if m == "diverged"} == {6}


@pytest.mark.parametrize("poison", ['{"lr": NaN, "scores": {"0.1": 1.0}}', '{"lr": Infinity, "scores": {}}',
                                    '{"lr": -0.1, "scores": {}}', '{"lr": 5.0, "scores": {"5.0": 1.0}}',
                                    '{"lr": "0.1", "scores": {}}', '{"lr": 0.1, "scores": {"0.1": NaN}}',
                                    '{"lr": 0.1}', "not json"],
                         ids=["lr NaN", "lr inf", "lr negative", "lr off the grid", "lr a string", "score NaN",
                              "no scores", "garbage"])
def test_a_poisoned_lr_cache_is_ignored_with_a_warning_and_recomputed(poison, synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("L2O_DYNAMICS_CACHE", str(tmp_path))
    grid = (1e-2, 0.1)
    found = search_lr("sgd", "relu", synthetic, 5, grid=grid, seeds=(1,))
    [path] = (tmp_path / "lr_search").glob("*.json")
    path.write_text(poison)
    with pytest.warns(UserWarning, match="ignoring the learning-rate cache"):
        again = search_lr("sgd", "relu", synthetic, 5, grid=grid, seeds=(1,))
    assert not again.cached and again.lr == found.lr
    assert json.loads(path.read_text())["lr"] == found.lr  # the cache is healed


# ---- seed families (seeds.py) ------------------------------------------------------------------
def test_seed_families_are_disjoint_and_hold_the_searches_and_validation_runs():
    from l2o_dynamics import meta, seeds

    blocks = list(seeds.FAMILIES.values())
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            assert a.stop <= b.start or b.stop <= a.start, (a, b)
    assert seeds.seed_family(4) == "selection" and seeds.seed_family(100) == "report"  # docs' 0-4; report from 100
    assert {seeds.seed_family(s) for s in runner.SEARCH_SEEDS} == {"lr-search"}
    top = meta.VAL_SEEDS + meta.RANGES["val_runs"].hi - 1  # the most validation runs a config may ask for
    assert seeds.seed_family(meta.VAL_SEEDS) == seeds.seed_family(top) == "validation"


def test_first_seeds_of_each_family_are_the_documented_blocks():
    from l2o_dynamics.seeds import describe_seeds, lr_search_seeds, report_seeds, selection_seeds

    assert report_seeds(3) == (100, 101, 102)
    assert selection_seeds(5) == (0, 1, 2, 3, 4)
    assert lr_search_seeds(3) == (10_000, 10_001, 10_002)
    assert describe_seeds([100, 101, 102, 107, 3]) == "100-102, 107, 3"


@pytest.mark.parametrize("bad,message", [([], "no seeds given"), ([100, -1], "out of range"),
                                         ([100, 100], "given twice"), ([1.0], "not an integer"),
                                         ([True], "not an integer"), ("100", "list of integer seeds"),
                                         (list(range(1001)), "at most 1000")])
def test_check_seeds_rejects_a_bad_list_in_one_line(bad, message):
    from l2o_dynamics.seeds import check_seeds

    with pytest.raises(L2OError, match=message):
        check_seeds(bad)
