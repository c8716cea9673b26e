"""Every install path installs the tested versions (constraints.txt), and the Dockerfile's pip steps
resolve against that lock with pip's own resolver (a dry run: no Docker daemon needed)."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def lock_pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            assert not requirement.extras, f"constraints.txt: pip refuses extras in a constraints file: {line}"
            [spec] = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name.lower().replace("_", "-")] = Version(spec.version)
    return pins


def dockerfile_pip_steps() -> list[str]:
    """The Dockerfile's `pip install` commands, its ARG defaults substituted."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    steps = []
    for run in re.findall(r"^RUN (.*)$", text, re.M):
        for command in run.split("&&"):
            if "pip install" in command:
                steps.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], command.strip()))
    return steps


def test_the_lock_pins_every_dependency_within_pyproject_ranges():
    pins = lock_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        name = requirement.name.lower()
        assert name in pins, f"constraints.txt has no pin for {name}"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {line}"


def test_all_three_install_paths_go_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := constraints.txt" in makefile and "LOCK=$(LOCK) bash scripts/install.sh" in makefile
    install = (ROOT / "scripts" / "install.sh").read_text()
    pip_lines = [line for line in install.splitlines() if "install -q" in line]
    assert len(pip_lines) == 5 and all('"${constrain[@]}"' in line for line in pip_lines)
    assert "+cpu" not in makefile + install  # a CUDA build of the pinned torch passes too
    steps = dockerfile_pip_steps()
    assert len(steps) == 3 and all("-c constraints.txt" in step for step in steps), steps
    assert any("--no-build-isolation deepspeed" in step for step in steps)
    launcher = yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())["setup_commands"]
    pips = [c for c in launcher if "pip install" in c]
    assert pips and all("-c /app/constraints.txt" in c for c in pips)
    assert any("--no-build-isolation deepspeed" in c for c in pips)


def test_the_dockerfile_pip_steps_resolve_against_the_lock():
    """What the image build would install, resolved here by pip with --dry-run: a constraints file
    pip refuses, or a pin that conflicts with a requirement, fails here instead of in `docker build`."""
    pins = lock_pins()
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for step in dockerfile_pip_steps():
        words = shlex.split(step)
        assignments = dict(w.split("=", 1) for w in words[:words.index("pip")])
        arguments = words[words.index("install") + 1:]
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", "-", *arguments],
            cwd=ROOT, env={**env, **assignments}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{step}\n{done.stderr[-3000:]}"
        report = json.loads(done.stdout)
        for item in report["install"]:
            name = item["metadata"]["name"].lower().replace("_", "-")
            version = Version(item["metadata"]["version"])
            if name != "distinf":
                assert name in pins and Version(version.public) == pins[name], (step, name, version)
