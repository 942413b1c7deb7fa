"""The Dockerfile, read as Docker reads it: the image the Kubernetes manifest names.

No registry can be reached from CI, so the image is not built here (`make image`
builds it on a base made from Debian packages, and `make rehearse IMAGE=…` runs
it); these checks hold the file to what the manifest and the Procfile expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent


def _instructions() -> list[tuple[str, str]]:
    return [(i["instruction"], i["value"]) for i in DockerfileParser(path=str(ROOT / "Dockerfile")).structure]


def _deployment() -> dict[str, Any]:
    documents = yaml.safe_load_all((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    return next(d for d in documents if d["kind"] == "Deployment")


def test_the_image_runs_the_procfile_command_as_the_manifests_user_on_the_python_we_pin() -> None:
    instructions = _instructions()
    stages = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    assert len(stages) == 2 and instructions[stages[0]][1].endswith(" AS build"), instructions
    python = (ROOT / ".python-version").read_text().strip()
    base = [value for name, value in instructions if name == "ARG" and value.startswith("BASE=")]
    assert base == [f"BASE=python:{python}-slim-bookworm"] and instructions[stages[1]][1] == "${BASE}"
    final = instructions[stages[1] :]
    pod = _deployment()["spec"]["template"]["spec"]
    user = [value for name, value in final if name == "USER"]
    assert user == [f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"]
    # The manifest's own command: uvicorn's supervisor (not a shell) is PID 1 and gets the SIGTERM.
    command = [value for name, value in final if name == "CMD"]
    assert len(command) == 1 and yaml.safe_load(command[0]) == pod["containers"][0]["command"]
    assert [value for name, value in final if name == "EXPOSE"] == [
        str(pod["containers"][0]["ports"][0]["containerPort"])
    ]


def test_the_image_holds_the_runtime_requirements_and_nothing_else() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "requirements.txt" in text and "requirements-dev" not in text
    copies = [value for name, value in _instructions() if name == "COPY"]
    copied = {value.split()[0] for value in copies if not value.startswith("--from")}
    assert copied == {"requirements.txt", "Procfile", "service", "artifacts"}
    # The build context holds only what the image copies: everything is ignored but those.
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert {rule.strip("!/") for rule in rules if rule.startswith("!")} == copied
