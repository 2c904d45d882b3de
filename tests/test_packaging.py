"""The package works when installed, not only from its checkout: the wheel ships the configs, a fresh venv with only
that wheel runs the CLI, and an editable install maps the checkout's configs/ into the package. CI installs what the
README says, pinned by constraints.txt."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from m2d_jax.cli import main
from m2d_jax.config_utils import load_config
from m2d_jax.hf.oracle import make_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "m2d_jax", "configs")  # what the build reads
SHIPPED_CONFIGS = ("demo", "distill/base")
CONFIG_FILES = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.py"))
TINY_MOE = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, num_experts=4,
                num_experts_per_tok=2, max_position_embeddings=64)
# prints where m2d_jax and its configs come from, and the shipped configs as JSON
PROBE = f"""
import importlib.resources, json, m2d_jax
from m2d_jax.config_utils import config_dir, load_config
print(json.dumps(dict(module=m2d_jax.__file__, config_dir=str(config_dir()),
                      package_configs=str(importlib.resources.files("m2d_jax.configs")),
                      configs={{n: load_config(n).to_dict() for n in {SHIPPED_CONFIGS!r}}}), default=str))
"""


def _run(args, cwd, env=None):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env():
    """No PYTHONPATH (it would put this checkout's m2d_jax first), no site-packages of the user."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}, "PYTHONNOUSERSITE": "1"}


def _source_copy(dst: Path) -> Path:
    """The checkout's build inputs, copied so that building writes nothing (build/, *.egg-info) into the checkout."""
    dst.mkdir()
    for name in BUILD_INPUTS:
        src = REPO / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def _venv(path: Path) -> Path:
    """A fresh venv that sees the machine's packages (jax, transformers, pip) but installs into itself."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path], cwd=path.parent)
    return path / "bin" / "python"


def _probe(python: Path, cwd: Path) -> dict:
    return json.loads(_run([python, "-c", PROBE], cwd=cwd, env=_clean_env()).stdout.strip().splitlines()[-1])


def _expected_configs() -> dict:
    return json.loads(json.dumps({n: load_config(n).to_dict() for n in SHIPPED_CONFIGS}, default=str))


@pytest.mark.slow
def test_wheel_install_in_a_fresh_venv_runs_on_its_own(tmp_path, capsys):
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
         cwd=tmp_path, env=_clean_env())
    (wheel,) = dist.glob("m2d_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"m2d_jax/configs/{name}" for name in CONFIG_FILES} <= names
    assert "m2d_jax/data/corpus/python_docs.jsonl.gz" in names
    assert {f"m2d_jax/data/teachers/{teacher}/{file}" for teacher in ("moe", "dense") for file in (
        "config.json", "model.safetensors", "tokenizer.json", "training.json")} <= names  # the shipped teachers

    venv = tmp_path / "venv"
    python = _venv(venv)
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel], cwd=tmp_path,
         env=_clean_env())
    work = tmp_path / "elsewhere"  # not the checkout: nothing on sys.path but the venv and the machine's packages
    work.mkdir()
    probe = _probe(python, work)
    site = venv.resolve()
    assert Path(probe["module"]).resolve().is_relative_to(site), probe["module"]  # the wheel, not the editable
    assert Path(probe["config_dir"]).resolve() == Path(probe["package_configs"]).resolve()
    assert Path(probe["config_dir"]).resolve().is_relative_to(site)
    assert probe["configs"] == _expected_configs()

    m2d = venv / "bin" / "m2d"
    usage = _run([m2d, "--help"], cwd=work, env=_clean_env()).stdout
    assert all(command in usage for command in ("demo", "distill", "info", "convert"))
    hf_dir = make_hf_checkpoint(TINY_MOE, tmp_path / "tiny_moe")
    info = json.loads(_run([m2d, "info", hf_dir, "--json"], cwd=work, env=_clean_env()).stdout)
    assert main(["info", str(hf_dir), "--json"]) == 0
    assert info == json.loads(capsys.readouterr().out)  # the installed CLI says what the checkout's says
    assert (info["experts"], info["top_k"]) == (TINY_MOE["num_experts"], TINY_MOE["num_experts_per_tok"])
    # m2d distill reads the shipped distill/base schema, then rejects the missing student in one line
    distill = subprocess.run([m2d, "distill", "--config", "configs/distill/base.py"], cwd=work, env=_clean_env(),
                             capture_output=True, text=True, timeout=600)
    assert distill.returncode == 2 and distill.stderr.strip().splitlines() == [
        "m2d distill: error: config field student.path: required (or --student PATH)"], distill.stderr


@pytest.mark.slow
def test_editable_install_maps_the_checkout_configs_into_the_package(tmp_path):
    src = _source_copy(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", src], cwd=tmp_path,
         env=_clean_env())
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = _probe(python, work)
    assert Path(probe["module"]).resolve() == (src / "m2d_jax" / "__init__.py").resolve()
    assert Path(probe["package_configs"]).resolve() == (src / "configs").resolve()
    assert Path(probe["config_dir"]).resolve() == (src / "configs").resolve()
    assert probe["configs"] == _expected_configs()


def _readme_commands() -> list[str]:
    """The two newcomer commands: the first lines of the README's first code block, without their comments."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()[:2]]


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    (install, demo), (install_again, tests) = (cmd.split(" && ") for cmd in _readme_commands())
    assert install == install_again and demo == "m2d demo" and "-c constraints.txt" in install
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [install, tests]


def _installed_requirements(requirements: list[str]) -> dict[str, str]:
    """Installed versions of everything ``requirements`` bring in (transitively), by canonical name."""
    found, done = {}, set()
    todo = [(Requirement(r), {""}) for r in requirements]  # (requirement, extras of the package that requires it)
    while todo:
        requirement, parent_extras = todo.pop()
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in done:
            continue
        done.add(key)
        dist = metadata.distribution(requirement.name)
        found[key[0]] = dist.version
        todo.extend((Requirement(r), set(requirement.extras) or {""}) for r in dist.requires or [])
    return found


def test_constraints_pin_every_installed_dependency_at_its_tested_version():
    """constraints.txt pins every package the README's install brings in, and this environment is the pinned one
    (a dependency added to pyproject.toml without a pin, or a drifted install, fails here)."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = _installed_requirements(project["dependencies"] + project["optional-dependencies"]["test"])
    assert sorted(set(installed) - set(pins)) == []
    assert {n: v for n, v in installed.items() if Version(v).public != Version(pins[n]).public} == {}
    assert pins["torch"] == "2.13.0"
