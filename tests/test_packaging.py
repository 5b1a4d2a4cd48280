"""The repository's set-up files agree with each other (one dependency list, one Python range)."""

import pathlib
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_parses_and_defers_to_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-e .[dev]" in pip
    # no second dependency list: besides python/pip only the torch pin (installed first) may appear
    conda_pkgs = [d for d in deps if isinstance(d, str)]
    assert {p.split(">")[0].split("=")[0].split("<")[0] for p in conda_pkgs} == {"python", "pip"}
    assert [p for p in pip if p != "-e .[dev]"] == ["torch==2.13.0"]


def test_python_range_matches():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    spec = py[len("python"):].replace(" ", "")
    assert spec == _pyproject()["project"]["requires-python"].replace(" ", "")


def test_torch_pin_matches_makefile():
    make = (ROOT / "Makefile").read_text()
    assert "TORCH_SPEC  ?= torch==2.13.0" in make
    deps = _pyproject()["project"]["dependencies"]
    assert any(d.startswith("torch") for d in deps)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make reproduce" in (ROOT / "README.md").read_text()
