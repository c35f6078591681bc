"""Our numbers beside the study's published values (published.py, report.study_blocks)."""
import math

from l2o_dynamics import published, report
from l2o_dynamics.results import PUBLISHED, Table


def _rows(experiment, optimizee, optimizer, metric, values_by_step, seeds=(100, 101)):
    return [(experiment, optimizee, optimizer, math.nan, s, step, metric, v + 0.2 * i)
            for step, v in values_by_step.items() for i, s in enumerate(seeds)]


def test_fig1_rows_put_the_study_the_study_as_a_step_and_ours_side_by_side():
    # the L2O's raw output is 10x its step (eta 0.1): 30 as the study measured, 3 corrected, at iteration 10
    rows = _rows("symmetry-breaking", "leaky_relu", "l2o", f"rescale_deviation{PUBLISHED}", {9: 30.0, 19: 40.0})
    rows += _rows("symmetry-breaking", "leaky_relu", "l2o", "rescale_deviation", {9: 3.0, 19: 4.0})
    rows += _rows("symmetry-breaking", "leaky_relu", "l2o[authors]", "rescale_deviation", {9: 5.0})
    header, body = published.fig1_rows(Table.from_rows(rows))
    by = {(r[0], r[1], r[2]): r[3:] for r in body}
    # study 24 at it. 10 as plotted, 2.4 as a step; ours: mean over the two seeds (+0 and +0.2)
    assert by[("rescale (leaky_relu)", "l2o", "10")] == ["24", "2.4", "30.1", "3.1"]
    assert by[("rescale (leaky_relu)", "l2o", "20")] == ["30", "3", "40.1", "4.1"]
    assert by[("rescale (leaky_relu)", "l2o", "100")] == ["50", "5", "-", "-"]  # not measured here
    assert by[("rescale (leaky_relu)", "l2o[authors]", "10")] == ["24", "2.4", "-", "5.1"]
    # a baseline's study value is not converted; the panels without our runs keep the study's values
    assert by[("scale (bn_relu)", "adam", "100")][:2] == ["9", "9"]
    assert header[3:] == ["study, as plotted", "study, as a step", "ours, as the study measured",
                          "ours, corrected (the step)"]


def test_covariance_rows_list_every_checkpoint_step_0_included_and_never_averaged():
    rows = _rows("noise", "leaky_relu", "adam", "cov_max_eig", {0: 2e-2, 250: 3e-4, 1000: 2e-4})
    header, body = published.covariance_rows(Table.from_rows(rows))
    assert header == ["optimizer", "study (it. 1 / 20 / 1000)", "ours, step 0", "ours, step 250", "ours, step 1000"]
    assert body == [["adam", "- / 0.0003 / 0.0003", "0.12", "0.1", "0.1"]]  # seeds +0, +0.2


def test_the_generated_part_of_a_page_is_replaced_between_its_markers_only(tmp_path):
    page = tmp_path / "replication.md"
    page.write_text("# Hand-written\n<!-- replication:start -->\nold\n<!-- replication:end -->\nkept\n")
    assert report.replace_marked(page, "replication", "new table\n")
    assert page.read_text() == "# Hand-written\n<!-- replication:start -->\nnew table\n<!-- replication:end -->\nkept\n"
    other = tmp_path / "other.md"
    other.write_text("no markers\n")
    assert not report.replace_marked(other, "replication", "x") and other.read_text() == "no markers\n"
    assert not report.replace_marked(tmp_path / "missing.md", "replication", "x")
