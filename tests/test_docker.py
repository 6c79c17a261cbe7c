"""docker/: the compose file, the Dockerfiles and the root .dockerignore, checked against the
code they deploy. No Docker engine runs here, so these are static checks, each of a mistake
that would only show up on `docker compose up`: a flag a service does not have, a port dialled
that nobody serves, a health check probing the wrong port, a worker that cannot scale, a COPY
of something left out of the build context."""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet  # pytest's own dependency

from astraea import healthcheck
from astraea.profile import load_profile
from astraea.telemetry import TelemetryConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport, if installed
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]

PREDICTOR, CONTROL_PLANE, WORKER, GPU_WORKER = "predictor", "control-plane", "worker", "gpu-worker"
SIM_WORKERS = (WORKER,)
ALL_WORKERS = (WORKER, GPU_WORKER)
DOCKER_STOP_DEFAULT_S = 10.0  # what `docker stop` waits before SIGKILL without stop_grace_period

# Host settings under which the whole file must still hold together (compose reads them from
# the environment or an .env file); the empty one is the defaults written in the file.
ENVIRONMENTS = [
    {},
    {"ASTRAEA_POLICY": "infercept", "ASTRAEA_PROFILE": "llama3-8b-h100",
     "ASTRAEA_TIME_SCALE": "0.05", "ASTRAEA_PORT": "60051",
     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "ASTRAEA_LOG_LEVEL": "debug",
     "ASTRAEA_MODEL": "/models/llama-3-8b-instruct"},
]


# --- reading the files ---------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_]\w*))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}.
    Any other form is left as written, and `test_compose_uses_only_known_substitutions` fails."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group("dollar"):
            return "$"
        name = m.group("braced") or m.group("bare")
        if m.group("op") == ":-":
            return env.get(name) or m.group("default")
        if m.group("op") == "-":
            return env.get(name, m.group("default"))
        return env.get(name, "")

    return _VAR.sub(sub, value)


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return interpolate(raw_compose()["services"], env or {})


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def parser_for(script: str):
    """The real argparse parser behind a console script of pyproject's [project.scripts]."""
    assert script in SCRIPTS, f"{script!r} is not a console script in pyproject.toml"
    module = importlib.import_module(SCRIPTS[script].split(":")[0])
    return module.build_parser()


def parse(service: dict):
    cmd = command(service)
    parser = parser_for(cmd[0])
    # Whole flag names only: argparse accepts a prefix (--kv-block), which a new flag sharing
    # it would silently turn into an error.
    known = set(parser._option_string_actions)
    for arg in cmd[1:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"{cmd[0]}: {arg} is not one of its flags"
    try:
        return parser.parse_args(cmd[1:])
    except SystemExit:
        pytest.fail(f"{cmd} does not parse with {cmd[0]}'s flags (argparse's message above)")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def duration_s(text: str) -> float:
    """A compose duration such as 5s, 1m30s or 500ms."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (DOCKER / name).read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    sources = []
    for word, rest in instructions:
        if word in ("COPY", "ADD"):
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            sources += [s.rstrip("/") for s in args[:-1]]
    return sources


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            out += pattern[i:j + 1]
            i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern_regex(os.path.normpath(line.lstrip("!").lstrip("/")))))
    return rules


def in_context(path: str, rules=None) -> bool:
    """Whether a repo-relative path reaches the builder, as BuildKit decides: a pattern applies
    when it matches the path or any directory above it, and the last one that applies wins."""
    rules = dockerignore_patterns() if rules is None else rules
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            included = negated
    return included


# --- compose -------------------------------------------------------------------------------

def test_compose_has_the_services_and_nothing_unresolved() -> None:
    svc = services()
    assert {PREDICTOR, CONTROL_PLANE, WORKER, GPU_WORKER} <= set(svc)


def test_compose_uses_only_known_substitutions() -> None:
    # A substitution form `interpolate` does not know would leave "${" behind and make every
    # other check here read the file wrongly.
    for env in ENVIRONMENTS:
        leftover = re.findall(r"\$\{[^}]*\}", str(services(env)))
        assert not leftover, leftover


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_every_command_parses_with_the_services_real_flags(env) -> None:
    svc = services(env)
    for name in (PREDICTOR, CONTROL_PLANE, *SIM_WORKERS):
        args = parse(svc[name])
        load_profile(args.profile)  # the named hardware profile exists
        if hasattr(args, "time_scale"):
            assert args.time_scale > 0, name
    assert command(svc[PREDICTOR])[0] == "astraea-predictor"
    assert command(svc[CONTROL_PLANE])[0] == "astraea-control-plane"
    for name in ALL_WORKERS:
        assert command(svc[name])[0] == "astraea-worker"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_gpu_worker_command_parses_and_runs_vllm_on_the_chosen_model(env) -> None:
    cmd = command(services(env)[GPU_WORKER])
    args = parser_for(cmd[0]).parse_args(cmd[1:])
    assert args.backend == "vllm"
    assert args.model == env.get("ASTRAEA_MODEL", "tiny")


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_clients_dial_what_the_servers_listen_on(env) -> None:
    svc = services(env)
    pred, cp = parse(svc[PREDICTOR]), parse(svc[CONTROL_PLANE])
    # 0.0.0.0: reachable from the other containers, not only from inside its own.
    assert host_port(pred.listen)[0] == "0.0.0.0"
    assert host_port(cp.listen)[0] == "0.0.0.0"
    # Containers reach each other by service name on the compose network.
    assert cp.predictor == f"{PREDICTOR}:{host_port(pred.listen)[1]}"
    for name in ALL_WORKERS:
        cmd = command(svc[name])
        dialled = cmd[cmd.index("--control-plane") + 1]
        assert dialled == f"{CONTROL_PLANE}:{host_port(cp.listen)[1]}", name


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_published_port_is_the_control_planes_listen_port(env) -> None:
    svc = services(env)
    cp_port = host_port(parse(svc[CONTROL_PLANE]).listen)[1]
    published = svc[CONTROL_PLANE]["ports"]
    assert published, "agent clients on the host need the control plane's port"
    for mapping in published:
        parts = str(mapping).split(":")
        assert int(parts[-1]) == cp_port
        assert len(parts) == 3 and parts[0] == "127.0.0.1", \
            f"{mapping}: publish on loopback only (the API has no authentication)"
    assert str(env.get("ASTRAEA_PORT", "50051")) in published[0]


@pytest.mark.parametrize("name", [PREDICTOR, CONTROL_PLANE])
def test_health_check_probes_the_port_the_service_serves(name) -> None:
    svc = services()[name]
    listen_port = host_port(parse(svc).listen)[1]
    check = svc["healthcheck"]
    test = check["test"]
    assert test[:4] == ["CMD", "python", "-m", "astraea.healthcheck"], test
    probe = healthcheck.build_parser().parse_args(test[4:])
    # From inside the container: the server listens on 0.0.0.0, which includes loopback.
    assert host_port(probe.address) == ("127.0.0.1", listen_port)
    # The probe gives up before Docker kills it, so a slow answer reads "unhealthy: …".
    assert probe.timeout < duration_s(check["timeout"])
    assert check["retries"] >= 1


def test_depends_on_waits_for_services_that_have_health_checks() -> None:
    svc = services()
    for name, s in svc.items():
        deps = s.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs the long form with conditions"
        for dep, spec in deps.items():
            assert dep in svc, f"{name} depends on unknown service {dep!r}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in svc[dep], f"{name} waits for {dep}, which has no health check"
            # A service a default `up` starts must not wait on one only a profile starts.
            assert set(svc[dep].get("profiles", [])) <= set(s.get("profiles", [])), (name, dep)
    for name in ALL_WORKERS:
        assert svc[name]["depends_on"][CONTROL_PLANE]["condition"] == "service_healthy", name
    assert svc[CONTROL_PLANE]["depends_on"][PREDICTOR]["condition"] == "service_healthy"


def test_simulated_workers_scale_independently() -> None:
    worker = services()[WORKER]
    assert worker["deploy"]["replicas"] >= 2
    # Each of these would make a second replica collide with the first.
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker
    # Without --name each replica registers under its own container hostname.
    assert "--name" not in command(worker)
    assert parse(worker).backend == "sim"


def test_gpu_worker_only_under_the_gpu_profile_with_one_gpu() -> None:
    svc = services()
    assert svc[GPU_WORKER]["profiles"] == ["gpu"]
    for name, s in svc.items():
        if name != GPU_WORKER:
            assert "profiles" not in s, f"{name} must start with a plain `docker compose up`"
    devices = svc[GPU_WORKER]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert devices[0].get("count") == 1 or len(devices[0].get("device_ids", [])) == 1
    # Compose hands every replica of a service the same GPU: more GPUs, more services.
    assert svc[GPU_WORKER].get("deploy", {}).get("replicas", 1) == 1
    assert svc[GPU_WORKER]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    for name in (PREDICTOR, CONTROL_PLANE, WORKER):
        assert "resources" not in svc[name].get("deploy", {}), f"{name} needs no GPU"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_control_plane_and_workers_agree_on_time_scale_and_profile(env) -> None:
    # The README: --time-scale goes to the control plane and to every worker; the control plane
    # costs work with the profile the workers' engines run.
    svc = services(env)
    cp = parse(svc[CONTROL_PLANE])
    for name in SIM_WORKERS:
        w = parse(svc[name])
        assert (w.time_scale, w.profile) == (cp.time_scale, cp.profile), name
    assert parse(svc[PREDICTOR]).profile == cp.profile
    if "ASTRAEA_TIME_SCALE" in env:
        assert cp.time_scale == float(env["ASTRAEA_TIME_SCALE"])
        assert cp.policy == env["ASTRAEA_POLICY"]


def test_telemetry_environment_is_what_the_services_read() -> None:
    class Recording(dict):
        def __init__(self) -> None:
            super().__init__()
            self.read: set[str] = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

    env = Recording()
    TelemetryConfig.from_env("probe", env)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in env.read
    host = ENVIRONMENTS[1]
    for name, s in services().items():
        passed = s.get("environment", {})
        assert isinstance(passed, dict), name
        assert set(passed) <= env.read, f"{name}: {set(passed) - env.read} is read by nothing"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in passed, name
        # The defaults written in the file are valid settings: no OTLP export.
        assert TelemetryConfig.from_env(name, passed).otlp_endpoint is None
        # A collector set on the host reaches the container.
        inside = services(host)[name]["environment"]
        assert TelemetryConfig.from_env(name, inside).otlp_endpoint == \
            host["OTEL_EXPORTER_OTLP_ENDPOINT"]


def test_shutdown_grace_fits_in_dockers_stop_timeout() -> None:
    # `docker compose stop` sends SIGTERM, then SIGKILL after stop_grace_period; the drain
    # (--grace) must end before, or in-flight calls and the predictor's state save are cut.
    for name in (PREDICTOR, CONTROL_PLANE):
        s = services()[name]
        limit = duration_s(s["stop_grace_period"]) if "stop_grace_period" in s \
            else DOCKER_STOP_DEFAULT_S
        assert parse(s).grace < limit, name


def test_predictor_state_is_on_a_named_volume() -> None:
    raw = raw_compose()
    pred = services()[PREDICTOR]
    state = parse(pred).state
    assert state, "without --state the predictor forgets what it learnt at every restart"
    mounts = {}
    for v in pred["volumes"]:
        source, target = v.split(":")[:2]
        mounts[target.rstrip("/")] = source
    directory = os.path.dirname(state)
    assert directory in mounts, f"{state} is not on a volume"
    assert mounts[directory] in raw["volumes"], "the volume must be declared at the top level"


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
    for name, s in services().items():
        script = command(s)[0]
        assert script in SCRIPTS, f"{name}: {script} is not in [project.scripts]"
        module, _, func = SCRIPTS[script].partition(":")
        assert callable(getattr(importlib.import_module(module), func)), script
