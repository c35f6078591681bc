import json

import numpy as np
import pytest
import torch

from l2o_dynamics.results import COLUMNS, MetricLog, Table, format_rows, prepare_out_dir, write_run
from l2o_dynamics.errors import L2OError


def test_metric_log_rows_are_tidy_and_roundtrip(tmp_path):
    log = MetricLog("meta-test", "leaky_relu", "adam", seeds=[0, 3])
    log.add("train_loss", 0, torch.tensor([2.3, 2.2]))
    log.add("train_loss", 1, [1.5, 1.25])
    log.add("lr", 0, 0.01)
    rows = log.rows()
    assert rows[0] == ("meta-test", "leaky_relu", "adam", "", 0, 0, "train_loss", pytest.approx(2.3))
    assert [r[4] for r in rows] == [0, 3, 0, 3, 0, 3]
    write_run(tmp_path / "run", {"kind": "meta-test", "seed": 0}, rows)
    text = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert text[0] == ",".join(COLUMNS)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["environment"]["torch"] == torch.__version__ and "git_commit" in cfg["environment"]
    t = Table.read(tmp_path / "run" / "metrics.csv")
    steps, seeds, vals = t.where(metric="train_loss").matrix()
    assert steps.tolist() == [0, 1] and seeds.tolist() == [0, 3]
    np.testing.assert_allclose(vals, [[2.3, 2.2], [1.5, 1.25]], rtol=1e-6)
    assert np.isnan(t.cols["beta"]).all()
    assert len(t.where(beta=None)) == len(t)


def test_beta_column_and_filters():
    rows = [("regularization", "bn_relu", "l2o", 0.5, 1, 0, "train_loss", 1.0),
            ("regularization", "bn_relu", "l2o", 0.0, 1, 0, "train_loss", 2.0),
            ("regularization", "bn_relu", "adam", "", 1, 0, "train_loss", 3.0)]
    t = Table.from_rows(rows)
    assert t.unique("beta") == [None, 0.0, 0.5]
    assert t.where(beta=0.5).cols["value"].tolist() == [1.0]
    assert t.where(optimizer=["adam", "sgd"]).cols["value"].tolist() == [3.0]
    assert "0.5" in format_rows(rows)


def test_out_dir_checks(tmp_path):
    prepare_out_dir(tmp_path / "full")  # new: now the tool's
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(L2OError, match="not empty; pass --overwrite"):
        prepare_out_dir(tmp_path / "full")
    prepare_out_dir(tmp_path / "full", overwrite=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "x").write_text("")
    with pytest.raises(L2OError, match="not made by l2o-dynamics"):
        prepare_out_dir(tmp_path / "user", overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(L2OError, match="not a directory"):
        prepare_out_dir(tmp_path / "file")
    with pytest.raises(L2OError, match="not writable"):
        prepare_out_dir(tmp_path / "file" / "sub")


def test_interrupted_write_leaves_nothing(tmp_path):
    class Boom:
        def __iter__(self):
            yield ("e", "o", "sgd", "", 0, 0, "train_loss", 1.0)
            raise KeyboardInterrupt

    from l2o_dynamics.results import write_csv

    with pytest.raises(KeyboardInterrupt):
        write_csv(tmp_path / "metrics.csv", Boom())
    assert list(tmp_path.iterdir()) == []
