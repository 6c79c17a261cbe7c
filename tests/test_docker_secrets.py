"""docker/compose.yaml's credentials: every gRPC hop mutual TLS plus a key or token, each file
a compose secret mounted under /run/secrets/. The static checks read the file as Docker
Compose renders it; the last test makes the files with the command docker/README.md gives,
starts the services as processes on loopback with exactly the flags the compose file gives
them (host paths and ports substituted), and runs a job through them."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_docker import (
    ALL_WORKERS,
    CONTROL_PLANE,
    DOCKER,
    ENVIRONMENTS,
    GATEWAY,
    PREDICTOR,
    ROOT,
    WORKER,
    command,
    host_port,
    in_context,
    parse,
    raw_compose,
    rendered,
)

from astraea.auth import read_key
from astraea.client import AgentClient, AstraeaError
from astraea.tools.cli.main import main as astraea_main

SECRETS = "/run/secrets/"
WAIT_S = 60.0  # one call
START_S = 240.0  # one service's start: minutes when the machine is loaded (the gateway's most)
ASTRAEA = (PREDICTOR, CONTROL_PLANE, *ALL_WORKERS, GATEWAY)


def mounted(service: dict) -> dict[str, str]:
    """Where each secret the service lists is mounted: target path -> secret name."""
    return {m["target"]: m["source"] for m in service.get("secrets", [])}


def secret_paths(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith(SECRETS)]


def probe_argv(service: dict) -> list[str]:
    test = service.get("healthcheck", {}).get("test", [])
    return list(test[1:]) if test[:1] == ["CMD"] else []


def secret_variables() -> dict[str, str]:
    """Each secret's host-path variable -> its default file (relative to docker/)."""
    out = {}
    for name, spec in raw_compose()["secrets"].items():
        m = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", spec["file"])
        assert m, f"secret {name}: its file must be a variable with a default, not {spec['file']}"
        out[m.group(1)] = m.group(2)
    return out


# --- static checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_every_secret_listed_is_defined_and_every_defined_one_is_used(env) -> None:
    file = rendered(env)
    used = set()
    for name, s in file["services"].items():
        for target, secret in mounted(s).items():
            assert secret in file["secrets"], f"{name} lists undefined secret {secret!r}"
            assert target == SECRETS + secret, f"{name}: {secret} mounted at {target}"
            used.add(secret)
    assert used == set(file["secrets"]), f"defined, never mounted: {set(file['secrets']) - used}"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_every_secret_path_a_command_passes_is_mounted_and_every_mount_is_read(env) -> None:
    for name, s in rendered(env)["services"].items():
        passed = set(secret_paths(command(s) if s.get("command") else []))
        probed = set(secret_paths(probe_argv(s)))
        mounts = set(mounted(s))
        assert passed | probed <= mounts, f"{name} reads {sorted((passed | probed) - mounts)}, " \
                                          "which it does not mount"
        assert mounts <= passed, f"{name} mounts {sorted(mounts - passed)} and reads nothing there"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=["defaults", "overridden"])
def test_every_grpc_hop_is_mutual_tls_with_a_key_on_both_ends(env) -> None:
    svc = rendered(env)["services"]
    pred, cp, gw = parse(svc[PREDICTOR]), parse(svc[CONTROL_PLANE]), parse(svc[GATEWAY])
    # The servers: TLS, and a client certificate from every caller.
    for args in (pred, cp):
        assert args.tls_cert and args.tls_key and args.tls_ca and args.tls_client_auth
    assert pred.token_file and cp.api_key_file and cp.worker_token_file
    # One CA, and each caller's token is the file the callee checks.
    assert cp.predictor_token_file == pred.token_file
    assert gw.control_plane_tls_ca == cp.tls_ca == pred.tls_ca
    assert gw.control_plane_key_file and gw.control_plane_tls_cert and gw.control_plane_tls_key
    for name in ALL_WORKERS:
        w = parse(svc[name])
        assert (w.tls_ca, w.token_file) == (cp.tls_ca, cp.worker_token_file), name
        assert w.tls_cert and w.tls_key, name
    # Nothing secret in an environment value.
    for name in ASTRAEA:
        assert not any(re.search("KEY|TOKEN|SECRET|PASSWORD", k.upper())
                       for k in svc[name].get("environment", {})), name


def test_secret_files_default_under_docker_secrets_which_git_and_the_build_ignore() -> None:
    files = rendered()["secrets"]
    variables = secret_variables()
    assert len(variables) == len(files), "one variable per secret"
    for spec in files.values():
        rel = Path(spec["file"]).relative_to(ROOT).as_posix()
        assert rel.startswith("docker/secrets/"), rel
        assert not in_context(rel), f"{rel} would reach the image build"
        assert subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT).returncode == 0, \
            f"{rel} is not ignored by git"
    # Each variable moves its own secret and nothing else.
    for var in variables:
        moved = rendered({var: "/etc/elsewhere/file"})["secrets"]
        changed = {n for n in files if moved[n]["file"] != files[n]["file"]}
        assert len(changed) == 1 and moved[changed.pop()]["file"] == "/etc/elsewhere/file", var


def documented_command(directory: Path) -> list[str]:
    """The `astraea certs` line of docker/README.md, writing to `directory`."""
    (line,) = re.findall(r"^astraea certs docker/secrets\b[^\n]*$",
                         (DOCKER / "README.md").read_text(), re.M)
    argv = line.split()[1:]
    return [str(directory) if a == "docker/secrets" else a for a in argv]


def make_secrets(directory: Path) -> None:
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert astraea_main(documented_command(directory)) == 0


def test_the_documented_command_writes_every_file_with_modes_the_containers_can_read(tmp_path):
    out = tmp_path / "secrets"
    make_secrets(out)
    defaults = {Path(f).name for f in secret_variables().values()}
    written = {p.name for p in out.iterdir()}
    assert defaults <= written, f"not written: {defaults - written}"
    # Owner-only directory; the mounted files readable by the containers' user (compose keeps
    # the host owner and mode); the CA's key stays private.
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in defaults:
        assert (out / name).stat().st_mode & stat.S_IROTH, name
    assert stat.S_IMODE((out / "ca-key.pem").stat().st_mode) == 0o600
    # The certificates are valid for the names the services dial, and for the probes' 127.0.0.1.
    svc = rendered()["services"]
    dialled = {host_port(parse(svc[CONTROL_PLANE]).predictor)[0],
               host_port(parse(svc[GATEWAY]).control_plane)[0]}
    for name in ALL_WORKERS:
        dialled.add(host_port(parse(svc[name]).control_plane)[0])
    env = {var: str(out / Path(default).name) for var, default in secret_variables().items()}
    files = rendered(env)["secrets"]
    for server in ("control_plane_tls_cert", "predictor_tls_cert"):
        cert = x509.load_pem_x509_certificate(Path(files[server]["file"]).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(sans.get_values_for_type(x509.DNSName)) | {
            str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        assert dialled | {"127.0.0.1"} <= names, server
    # Each certificate a service presents to a server is a client certificate.
    for presented in ("control_plane_tls_cert", "worker_tls_cert", "gateway_tls_cert"):
        cert = x509.load_pem_x509_certificate(Path(files[presented]["file"]).read_bytes())
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usage, presented
    # The gateway's key to the control plane is one the control plane accepts.
    keys = Path(files["control_plane_api_keys"]["file"]).read_text()
    assert f":{read_key(files['gateway_control_plane_key']['file'])}\n" in keys


# --- the compose wiring, run -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Localised:
    """The compose file's commands as processes on this machine: /run/secrets/NAME -> the
    secret's host file (only if the service mounts it), a mount target -> its host source (a
    named volume -> a fresh folder), SERVICE:PORT and 0.0.0.0:PORT -> 127.0.0.1 on a free port
    per (service, port), --metrics-port -> a free port. Nothing else changes."""

    def __init__(self, file: dict, tmp: Path) -> None:
        self.file, self.tmp = file, tmp
        self.ports: dict[tuple[str, int], int] = {}

    def port(self, service: str, port: int) -> int:
        return self.ports.setdefault((service, port), _free_port())

    def _address(self, name: str, m: re.Match) -> str:
        host, port = m.group(1), int(m.group(2))
        if host in ("0.0.0.0", "127.0.0.1"):
            return f"127.0.0.1:{self.port(name, port)}"
        if host in self.file["services"]:
            return f"127.0.0.1:{self.port(host, port)}"
        return m.group(0)

    def argv(self, name: str, argv: list[str]) -> list[str]:
        s = self.file["services"][name]
        secrets = mounted(s)
        mounts = {}
        for v in s.get("volumes", []):
            source = v["source"] if v["type"] == "bind" else str(self.tmp / "volumes" / v["source"])
            os.makedirs(source, exist_ok=True)
            mounts[v["target"]] = source
        out = []
        for i, a in enumerate(argv):
            if a.startswith(SECRETS):
                assert a in secrets, f"{name}: {a} is not mounted"
                a = self.file["secrets"][secrets[a]]["file"]
            for target, source in mounts.items():
                if a == target or a.startswith(target + "/"):
                    a = source + a[len(target):]
            # Whole arguments and inside them (the gateway's probe has its URL in Python code).
            a = re.sub(r"(?<![\w.-])([\w.-]+):(\d+)\b",
                       lambda m: self._address(name, m), a)
            if i and argv[i - 1] == "--metrics-port":
                a = str(self.port(name, int(a)))
            if i and argv[i - 1] == "--metrics-host":
                a = "127.0.0.1"
            out.append(a)
        return out


def _spawn(name: str, argv: list[str], env: dict, logs: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / argv[0]
    assert exe.exists(), f"{argv[0]} is not installed beside this Python (pip install -e .)"
    with open(logs / f"{name}.log", "wb") as err:
        return subprocess.Popen([str(exe), *argv[1:]], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)


def _until(what: str, ready, procs: dict[str, subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + START_S
    while not ready():
        for n, p in procs.items():
            if p.poll() is not None:
                pytest.fail(f"{n} exited ({p.returncode}) while waiting for {what}:\n"
                            f"{(logs / f'{n}.log').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {START_S:g} s")
        time.sleep(0.2)


def _probe(argv: list[str], env: dict) -> bool:
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0


def _serving_as(address: str, name: str, files: dict) -> int:
    """The health status of `address`, verified as the server `name` (the compose DNS name)."""
    read = {k: Path(files[k]["file"]).read_bytes()
            for k in ("tls_ca", "worker_tls_cert", "worker_tls_key")}
    creds = grpc.ssl_channel_credentials(read["tls_ca"], read["worker_tls_key"],
                                         read["worker_tls_cert"])
    with grpc.secure_channel(address, creds,
                             options=[("grpc.ssl_target_name_override", name)]) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                    timeout=10).status


@pytest.mark.timeout(900)  # four services start; about 1.5 min on a loaded 2-core machine
def test_the_compose_wiring_runs_a_job_over_mutual_tls_with_keys(tmp_path) -> None:
    import openai

    from worker.vllm.tiny_model import resolve_tokenizer

    secrets_dir, logs = tmp_path / "secrets", tmp_path / "logs"
    logs.mkdir()
    make_secrets(secrets_dir)
    env = {var: str(secrets_dir / Path(default).name)
           for var, default in secret_variables().items()}
    env.update(ASTRAEA_TIME_SCALE="0.05", OTEL_EXPORTER_OTLP_ENDPOINT="",
               ASTRAEA_TOKENIZER_DIR=resolve_tokenizer(None))
    file = rendered(env)
    svc, files = file["services"], file["secrets"]
    local = Localised(file, tmp_path)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("OTEL_", "ASTRAEA_"))}
    procs: dict[str, subprocess.Popen] = {}
    try:
        def start(name: str) -> dict:
            s = svc[name]
            penv = {**base_env, **{k: v for k, v in s.get("environment", {}).items() if v}}
            procs[name] = _spawn(name, local.argv(name, command(s)), penv, logs)
            return penv

        def healthy(name: str, penv: dict) -> None:  # the compose health check, as written
            probe = local.argv(name, probe_argv(svc[name]))
            probe[0] = sys.executable
            _until(f"{name}'s health check", lambda: _probe(probe, penv), procs, logs)

        # The gateway takes longest to start (it loads the tokenizer) and dials the control
        # plane only per request, so it starts at once beside the servers; the worker waits
        # for a healthy control plane, as depends_on says.
        started = {name: start(name) for name in (PREDICTOR, CONTROL_PLANE, GATEWAY)}
        healthy(PREDICTOR, started[PREDICTOR])
        healthy(CONTROL_PLANE, started[CONTROL_PLANE])
        start(WORKER)
        _until("the worker's registration",
               lambda: '"event": "registered"' in (logs / f"{WORKER}.log").read_text(), procs, logs)
        healthy(GATEWAY, started[GATEWAY])
        cp, pred = (f"127.0.0.1:{local.port(n, host_port(parse(svc[n]).listen)[1])}"
                    for n in (CONTROL_PLANE, PREDICTOR))
        # The certificates hold for the names compose dials, not only for 127.0.0.1.
        serving = health_pb2.HealthCheckResponse.SERVING
        assert _serving_as(cp, CONTROL_PLANE, files) == serving
        assert _serving_as(pred, PREDICTOR, files) == serving
        # Mutual TLS: the same probe without the service's certificate gets no answer.
        probe = local.argv(PREDICTOR, probe_argv(svc[PREDICTOR]))
        cert_flags = ("--tls-cert", "--tls-key")
        bare = [sys.executable] + [a for a, before in zip(probe[1:], probe)
                                   if a not in cert_flags and before not in cert_flags]
        assert "--tls-ca" in bare and not _probe(bare, base_env)

        # An agent client on the host: the CA, a client certificate and the "client" key.
        tls = {"tls_ca": str(secrets_dir / "ca.pem"), "tls_cert": str(secrets_dir / "client.pem"),
               "tls_key": str(secrets_dir / "client-key.pem")}
        key = read_key(str(secrets_dir / "client.key"))
        with AgentClient(cp, timeout=WAIT_S, api_key=key, **tls) as client:
            job = client.start_job(category="qa")
            seg = client.run_segment(job, prompt_token_ids=[1] * 16, max_tokens=4,
                                     next_tool_category="qa")
            assert len(seg.tokens) == 4
            with client.tool_call(job, "qa"):
                pass
            assert len(client.run_segment(job, prompt_token_ids=[1] * 4, max_tokens=2).tokens) == 2
            client.end_job(job)
        # Without the key: refused by the control plane; without a certificate: no handshake.
        with AgentClient(cp, timeout=WAIT_S, **tls) as client:
            with pytest.raises(AstraeaError) as err:
                client.start_job(category="qa")
            assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
        with AgentClient(cp, timeout=10, api_key=key, tls_ca=tls["tls_ca"]) as client:
            with pytest.raises(AstraeaError) as err:
                client.start_job(category="qa")
            assert err.value.code is grpc.StatusCode.UNAVAILABLE

        # An OpenAI client through the gateway, which reaches the control plane with its own
        # key and certificate.
        http = local.port(GATEWAY, host_port(parse(svc[GATEWAY]).listen)[1])
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", max_retries=0, timeout=WAIT_S,
                           api_key=read_key(str(secrets_dir / "gateway-api-keys"))) as oa:
            reply = oa.chat.completions.create(model=parse(svc[GATEWAY]).model, max_tokens=3,
                                               messages=[{"role": "user", "content": "Hello."}])
            assert reply.usage.completion_tokens == 3
        _until("the predictor link", lambda: "predictor connected" in
               (logs / f"{CONTROL_PLANE}.log").read_text(), procs, logs)
    finally:
        for p in reversed(procs.values()):
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    text = {n: (logs / f"{n}.log").read_text() for n in procs}
    # No service started with anything left open (each warns in one line if it did).
    assert not any("is unauthenticated" in t for t in text.values()), text
    assert {n: p.returncode for n, p in procs.items()} == dict.fromkeys(procs, 0), text
