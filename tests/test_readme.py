"""The README's Python tour runs as written (in a temporary directory), and its findings
block is the demo's table."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_python_tour_runs(tmp_path, monkeypatch, mnist):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has a Python tour"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "l2o" / "l2o.pt").exists()
    assert set(namespace["alpha"]) == {"alpha_grad_pub", "alpha_grad_pub_published", "alpha_grad", "alpha_grad_std"}
    assert namespace["dev"]["rel"].shape == (3,)


def test_cli_tour_commands_exist():
    from l2o_dynamics.cli import build_parser

    parser = build_parser()
    text = README.read_text().replace("\\\n", " ")  # join continued lines
    lines = re.findall(r"^l2o-dynamics ([^\n#]+)", text, re.M)
    assert len(lines) >= 10
    for line in lines:
        args = line.split()
        if "..." in args:
            continue
        # parse only: the command line must be valid (nothing runs)
        ns = parser.parse_args([a for a in args])
        assert ns.command


def test_readme_findings_block_is_the_demos_findings_table():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sync_readme", ROOT / "tools" / "sync_readme.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    readme = README.read_text()
    assert tool.synced(readme, (ROOT / "docs" / "findings.md").read_text()) == readme
    # the check can fail: a changed table is a changed README
    assert tool.synced(readme, "other table\n") != readme
