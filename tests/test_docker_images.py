"""The images: the Dockerfiles build from the repository root, copy the whole project, keep
local state out of the context, and run what compose and the manifests ask of them; and
Prometheus's scrape configuration targets the services' metrics ports (the compose file
itself is checked in test_docker.py, whose helpers these reuse)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet  # pytest's own dependency
from test_docker import (
    COMPOSE_FILE,
    DOCKER,
    PROMETHEUS,
    PYPROJECT,
    ROOT,
    SCRIPTS,
    astraea_services,
    command,
    copy_sources,
    dockerfile,
    dockerignore_patterns,
    host_port,
    in_context,
    parse,
    services,
)


def test_builds_use_the_repo_root_and_existing_dockerfiles() -> None:
    for name, s in services().items():
        if "build" not in s:
            continue
        context = (COMPOSE_FILE.parent / s["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / s["build"]["dockerfile"]).is_file(), name


# --- Dockerfiles and the build context -----------------------------------------------------

DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]


def _package_dirs() -> list[str]:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({p.rstrip("*").split(".")[0] for p in include})


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_the_whole_project_from_the_context(name) -> None:
    sources = copy_sources(dockerfile(name))
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], *_package_dirs()]
    missing = set(needed) - set(sources)
    assert not missing, f"{name} does not copy {missing} (pip install . needs them)"
    rules = dockerignore_patterns()
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"{name} copies {src}, which is not in the repository"
        files = [path] if path.is_file() else [
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, src
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if f.suffix in (".py", ".pyi", ".json", ".toml", ".md") or f == path:
                assert in_context(rel, rules), f".dockerignore leaves out {rel}, which {name} copies"


def test_dockerignore_keeps_local_state_out() -> None:
    rules = dockerignore_patterns()
    for path in [".git/HEAD", ".venv/bin/python", "tests/test_docker.py", "docs/results/x.json",
                 ".env", "astraea/__pycache__/cli.cpython-312.pyc",
                 "control_plane/service/__pycache__/server.cpython-312.pyc",
                 "astraea_serving.egg-info/PKG-INFO", "results-local.json"]:
        assert not in_context(path, rules), path
    # And the matcher itself tells a kept file from a dropped one.
    assert in_context("control_plane/service/server.py", rules)


def test_cpu_image_python_satisfies_requires_python() -> None:
    base = next(rest for word, rest in dockerfile("Dockerfile") if word == "FROM")
    m = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim(?:-\w+)?", base)
    assert m, f"{base}: pin the slim Python image to a patch release"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(m.group(1))


def test_gpu_image_base_is_the_vllm_it_pins() -> None:
    instructions = dockerfile("Dockerfile.gpu")
    base = next(rest for word, rest in instructions if word == "FROM")
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", base)
    assert m, f"{base}: pin vLLM's image to a release"
    installs = [rest for word, rest in instructions if word == "RUN" and "pip install" in rest]
    assert installs
    for rest in installs:
        assert re.findall(r"vllm==([\w.]+)", rest) == [m.group(1)], rest


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependencies_install_before_the_code_is_copied(name) -> None:
    # So that editing code reuses the cached dependency layer.
    instructions = dockerfile(name)
    order = [f"{w} {r}" for w, r in instructions]
    copy_pyproject = next(i for i, s in enumerate(order) if s.startswith("COPY pyproject.toml"))
    deps = next(i for i, s in enumerate(order) if s.startswith("RUN") and "pip install" in s)
    first_code = min(i for i, (w, r) in enumerate(instructions)
                     if w == "COPY" and set(copy_sources([(w, r)])) & set(_package_dirs()))
    assert copy_pyproject < deps < first_code, order
    assert "pyproject.toml" in order[deps]  # the list comes from pyproject, not a copy of it


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_run_as_a_user_and_let_compose_pick_the_command(name) -> None:
    instructions = dockerfile(name)
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entrypoints = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    # The python base has no ENTRYPOINT; vLLM's runs its server and must be cleared.
    assert entrypoints in ([], ["[]"]), entrypoints
    if name == "Dockerfile.gpu":
        assert entrypoints == ["[]"]


def test_console_scripts_named_in_compose_exist() -> None:
    for name, s in astraea_services().items():
        script = command(s)[0]
        assert script in SCRIPTS, f"{name}: {script} is not in [project.scripts]"
        module, _, func = SCRIPTS[script].partition(":")
        assert callable(getattr(importlib.import_module(module), func)), script


def test_prometheus_scrapes_the_port_every_service_serves_its_metrics_on() -> None:
    svc = services()
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {}
    for job in scrape["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(host_port(t) for t in static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update({name: dns["port"] for name in dns["names"]})
    assert set(targets) == set(astraea_services()), "every Astraea service, and only those"
    for name, port in targets.items():
        args = parse(svc[name])
        # 0.0.0.0: Prometheus is another container; the port stays unpublished.
        assert (args.metrics_host, args.metrics_port) == ("0.0.0.0", port), name
    prom = svc[PROMETHEUS]
    assert prom["profiles"] == ["metrics"]
    (mount,) = prom["volumes"]
    assert Path(mount["source"]) == DOCKER / "prometheus.yml" and mount["read_only"]
    assert f"--config.file={mount['target']}" in command(prom)
