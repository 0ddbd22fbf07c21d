"""Packaging stays consistent: pyproject vs environment.yml, and the README's test command vs CI."""

import re
import subprocess
import sys
import tomllib

import yaml

from .conftest import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_name(r): r for r in project["dependencies"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pip = {_name(r): r for r in pip_section if not r.startswith("-")}
    for name, requirement in runtime.items():
        assert conda_pip.get(name) == requirement, f"{name}: pyproject {requirement!r} vs environment.yml"
    for required in ("torch", "torchvision", "ray", "optuna", "pandas", "pyyaml"):
        assert required in runtime
    assert set(conda_pip) - set(runtime) <= {"pytest"}
    assert any(_name(r) == "pytest" for r in project["optional-dependencies"]["dev"])


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```(?:bash|sh)?\n(.*?)\n```", quick_start, re.S)
    assert len(commands) == 2, "Quick start must hold exactly two commands"
    test_lines = commands[1].strip().splitlines()
    assert test_lines[-1].startswith("pytest"), "the README's test command must end by running pytest"
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    ci = "\n".join(ci_lines)
    assert test_lines[0] in ci_lines, "CI must run the README's test command verbatim"
    start = ci_lines.index(test_lines[0])
    assert ci_lines[start:start + len(test_lines)] == test_lines, "CI must run the README's test command verbatim"
    assert "apt-get install -y dataset-fashion-mnist" in ci


def test_ray_is_imported_only_where_it_runs():
    """dualnet never imports Ray; tune's analysis and export commands do not need it either."""
    probe = ("import sys, dualnet, dualnet.train, dualnet.__main__; assert 'ray' not in sys.modules, 'dualnet'; "
             "import tune.__main__, tune.analysis, tune.report, tune.confirm, tune.config; "
             "assert 'ray' not in sys.modules, 'tune analysis'")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
