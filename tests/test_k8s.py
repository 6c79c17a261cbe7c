"""docker/k8s/: the kustomize base and the GPU overlay, checked against the code they deploy.
Each manifest file is complete on its own, so these checks read the files directly (the
validators' test, tests/test_deploy_validators.py, also renders them with kustomize where
kubectl is installed): every container command parses with its service's real flags, every
address dialled is a Service port that leads to the port the service listens on, the probes
ask the ports served, the variables set are the ones read, and the NetworkPolicies let
exactly the intended connections through."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from test_docker import (
    collector_otlp_ports,
    host_port,
    parse,
    telemetry_variables_read,
)

from astraea import healthcheck
from astraea.profile import load_profile
from astraea.telemetry import TelemetryConfig

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docker" / "k8s"
BASE, GPU = K8S / "base", K8S / "overlays" / "gpu"
COMPONENT, BACKEND = "app.kubernetes.io/component", "astraea.io/backend"


# --- reading the manifests -------------------------------------------------------------------

def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def manifest_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(*folders: Path) -> list[dict]:
    out = []
    for folder in folders:
        for path in manifest_files(folder):
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def stack(gpu: bool = False) -> list[dict]:
    return documents(BASE, GPU) if gpu else documents(BASE)


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def containers(docs: list[dict]):
    """(deployment name, container) for every container of every Deployment."""
    for name, dep in objects(docs, "Deployment").items():
        for c in pod_spec(dep)["containers"]:
            yield name, c


def astraea_containers(docs: list[dict]):
    for name, c in containers(docs):
        if c["image"].startswith("astraea:"):
            yield name, c, parse({"command": c["command"]})


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions, or a Service's plain map)."""
    match = selector.get("matchLabels", {}) if ("matchLabels" in selector
                                                 or "matchExpressions" in selector) else selector
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def resolve(docs: list[dict], address: str) -> tuple[dict, dict]:
    """The Deployment and container a `service:port` address reaches: through the Service's
    port, its targetPort (a name or a number) and the pods its selector picks."""
    name, port = host_port(address)
    services = objects(docs, "Service")
    assert name in services, f"{address}: no Service {name!r}"
    svc = services[name]
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port] or [None]
    assert sp, f"{address}: Service {name} has no port {port}"
    target = sp.get("targetPort", port)
    hits = []
    for dep in objects(docs, "Deployment").values():
        if not selects(svc["spec"]["selector"], pod_labels(dep)):
            continue
        for c in pod_spec(dep)["containers"]:
            for cp in c.get("ports", []):
                if target in (cp.get("name"), cp["containerPort"]):
                    hits.append((dep, c, cp["containerPort"]))
    assert len(hits) == 1, f"{address} leads to {len(hits)} container ports"
    dep, c, container_port = hits[0]
    if c["image"].startswith("astraea:"):
        # The port the Service forwards to is the one the process listens on.
        assert host_port(parse({"command": c["command"]}).listen)[1] == container_port, address
    return dep, c


# --- the kustomizations ----------------------------------------------------------------------

@pytest.mark.parametrize("folder", [BASE, GPU], ids=["base", "gpu"])
def test_kustomization_lists_exactly_the_manifests_present(folder) -> None:
    listed = [r for r in kustomization(folder)["resources"] if not r.startswith("..")]
    assert sorted(listed) == [p.name for p in manifest_files(folder)]


def test_gpu_overlay_builds_on_the_base() -> None:
    assert "../../base" in kustomization(GPU)["resources"]


SECRETS_DIR = "/etc/astraea/secrets/"


def generated() -> dict[str, dict[str, str]]:
    """Secret name -> {key: file, relative to base/}, from the base's secretGenerator."""
    return {g["name"]: dict(f.split("=", 1) for f in g["files"])
            for g in kustomization(BASE)["secretGenerator"]}


def mounted_secrets(dep: dict, container: dict) -> dict[str, tuple[str, str]]:
    """Path in the container -> (Secret name, key), for every Secret item it mounts."""
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    out = {}
    for m in container.get("volumeMounts", []):
        v = volumes[m["name"]]
        sources = [src["secret"] for src in v.get("projected", {}).get("sources", [])
                   if "secret" in src]
        if "secret" in v:
            sources.append({"name": v["secret"]["secretName"], **v["secret"]})
        for src in sources:
            assert m.get("readOnly") is True, f"{m['name']}: mount Secrets read-only"
            assert src.get("items"), f"{src['name']}: name the keys mounted (items)"
            for item in src["items"]:
                out[f"{m['mountPath'].rstrip('/')}/{item['path']}"] = (src["name"], item["key"])
    return out


def probe_commands(container: dict) -> list[list[str]]:
    return [container[k]["exec"]["command"] for k in ("readinessProbe", "livenessProbe")
            if "exec" in container.get(k, {})]


def test_credentials_are_generated_secrets_from_files_kept_out_of_git() -> None:
    for name, files in generated().items():
        for path in files.values():
            rel = (BASE / path).relative_to(ROOT).as_posix()
            ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT)
            assert ignored.returncode == 0, f"{rel} ({name}) is not ignored by git"
    # No Secret with data is committed.
    assert not objects(stack(gpu=True), "Secret")
    for name, c, _args in astraea_containers(stack(gpu=True)):
        assert not any(re.search("KEY|TOKEN|SECRET|PASSWORD", e["name"].upper())
                       for e in c.get("env", [])), name
    gw = objects(stack(), "Deployment")["gateway"]
    assert parse({"command": pod_spec(gw)["containers"][0]["command"]}).api_key == [], \
        "keys on the command line show in the pod spec"


@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu"])
def test_every_secret_file_a_flag_or_probe_names_is_a_generated_key_mounted_there(gpu) -> None:
    gen = generated()
    for name, dep in objects(stack(gpu), "Deployment").items():
        for c in pod_spec(dep)["containers"]:
            files = mounted_secrets(dep, c)
            for secret, key in files.values():
                assert key in gen.get(secret, {}), f"{name}: {secret}/{key} is not generated"
            named = [a for argv in (c.get("command", []), *probe_commands(c)) for a in argv
                     if a.startswith(SECRETS_DIR)]
            missing = set(named) - set(files)
            assert not missing, f"{name} reads {sorted(missing)}, which it does not mount"
            unused = set(files) - set(c.get("command", []))
            assert not unused, f"{name} mounts {sorted(unused)} and no flag reads it"


def _credentials(args) -> dict:
    """The security flags of a parsed command, secret files by their file name."""
    return {k: os.path.basename(v) if isinstance(v, str) else v for k, v in vars(args).items()
            if "tls" in k or k.endswith(("key_file", "token_file")) or k == "api_key"}


@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu"])
def test_credentials_are_wired_as_in_compose_from_the_same_files(gpu) -> None:
    from test_docker import rendered

    compose = rendered()
    compose_files = {n: os.path.basename(s["file"]) for n, s in compose["secrets"].items()}
    gen = generated()
    seen = set()
    for name, dep in objects(stack(gpu), "Deployment").items():
        if name not in compose["services"]:
            continue
        (c,) = pod_spec(dep)["containers"]
        if not c["image"].startswith("astraea:"):
            continue
        seen.add(name)
        k8s_args = parse({"command": c["command"]})
        assert _credentials(k8s_args) == _credentials(parse(compose["services"][name])), name
        # The file behind each is the one compose mounts (one `astraea certs` layout for both).
        for path, (secret, key) in mounted_secrets(dep, c).items():
            assert os.path.basename(gen[secret][key]) == compose_files[os.path.basename(path)], \
                (name, path)
    assert seen >= {"predictor", "control-plane", "worker", "gateway"}


def test_the_documented_command_writes_every_file_the_secrets_are_made_from(tmp_path) -> None:
    import contextlib

    from cryptography import x509

    from astraea.tools.cli.main import main

    (line,) = re.findall(r"^astraea certs docker/k8s/base/secrets\b[^\n]*$",
                         (K8S / "README.md").read_text(), re.M)
    argv = [str(tmp_path) if a == "docker/k8s/base/secrets" else a for a in line.split()[1:]]
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(argv) == 0
    for name, files in generated().items():
        for path in files.values():
            assert (tmp_path / os.path.basename(path)).is_file(), f"{name}: {path} not written"
    # The server certificates name every Service a container dials, and the probes' 127.0.0.1.
    dialled = {"127.0.0.1"}
    for _name, _c, args in astraea_containers(stack(gpu=True)):
        for flag in ("predictor", "control_plane"):
            if getattr(args, flag, None):
                dialled.add(host_port(getattr(args, flag))[0])
    for secret in ("control-plane-tls", "predictor-tls"):
        pem = (tmp_path / os.path.basename(generated()[secret]["tls.crt"])).read_bytes()
        sans = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        names = set(sans.get_values_for_type(x509.DNSName)) | {
            str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        assert dialled <= names, secret


# --- commands, ports, probes, variables --------------------------------------------------------

@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu"])
def test_every_command_parses_with_the_services_real_flags(gpu) -> None:
    seen = set()
    for _name, c, args in astraea_containers(stack(gpu)):
        seen.add(c["command"][0])
        if hasattr(args, "profile"):
            load_profile(args.profile)
    assert seen == {"astraea-predictor", "astraea-control-plane", "astraea-worker",
                    "astraea-gateway"}


@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu"])
def test_every_address_dialled_reaches_the_port_served(gpu) -> None:
    docs = stack(gpu)
    for name, c, args in astraea_containers(docs):
        dialled = [getattr(args, flag) for flag in ("predictor", "control_plane")
                   if getattr(args, flag, None)]
        for address in dialled:
            dep, _ = resolve(docs, address)
            expected = "predictor" if address.startswith("predictor") else "control-plane"
            assert pod_labels(dep)[COMPONENT] == expected, (name, address)
        # Spans and metrics: the collector's OTLP/gRPC receiver, through its Service.
        endpoint = TelemetryConfig.from_env(name, {e["name"]: e["value"] for e in c["env"]})
        url = urlparse(endpoint.otlp_endpoint)
        dep, col = resolve(docs, f"{url.hostname}:{url.port}")
        assert pod_labels(dep)[COMPONENT] == "collector"
        assert url.port == collector_otlp_ports()["grpc"]
    assert parse({"command": pod_spec(objects(docs, "Deployment")["control-plane"])
                  ["containers"][0]["command"]}).predictor


def test_probes_ask_the_port_and_path_served() -> None:
    docs = stack()
    for name, c, args in astraea_containers(docs):
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if "listen" not in vars(args):
                assert probe is None or "exec" in probe, f"{name} serves no port to probe"
                continue
            assert probe, f"{name} has no {kind}"
            port = host_port(args.listen)[1]
            if "grpc" in probe:  # the standard gRPC health service the server runs
                assert probe["grpc"]["port"] == port, name
                assert not getattr(args, "tls_cert", None), f"{name}: the kubelet's gRPC " \
                                                            "probe speaks no TLS"
            elif "exec" in probe:  # the same health service, asked over (mutual) TLS
                cmd = probe["exec"]["command"]
                assert cmd[:3] == ["python", "-m", "astraea.healthcheck"], name
                p = healthcheck.build_parser().parse_args(cmd[3:])
                assert host_port(p.address) == ("127.0.0.1", port), name
                assert p.timeout < probe["timeoutSeconds"], name
                assert p.tls_ca == args.tls_ca, name
                if args.tls_client_auth:
                    assert (p.tls_cert, p.tls_key) == (args.tls_cert, args.tls_key), name
            else:
                named = {p["name"]: p["containerPort"] for p in c["ports"]}
                probe_port = probe["httpGet"]["port"]
                assert named.get(probe_port, probe_port) == port, name
                assert probe["httpGet"]["path"] == "/health", name


@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu"])
def test_environment_set_is_what_the_services_read(gpu) -> None:
    read = telemetry_variables_read()
    for name, c, _ in astraea_containers(stack(gpu)):
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        assert set(env) <= read, f"{name}: {set(env) - read} is read by nothing"
        TelemetryConfig.from_env(name, env)  # and the values are valid


def test_collector_config_is_the_compose_one() -> None:
    cm = objects(stack(), "ConfigMap")["collector-config"]
    assert cm["data"]["config.yaml"] == (ROOT / "docker" / "otel-collector.yaml").read_text()
    col = objects(stack(), "Deployment")["collector"]
    (c,) = pod_spec(col)["containers"]
    (flag,) = [a for a in c["args"] if a.startswith("--config=")]
    directory, file = os.path.split(flag.split("=", 1)[1])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == directory]
    (volume,) = [v for v in pod_spec(col)["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "collector-config" and file in cm["data"]


# --- state, scaling, GPUs --------------------------------------------------------------------

def _claims(dep: dict, container: dict) -> dict[str, str]:
    """mount path → claim name, for the container's PersistentVolumeClaim mounts."""
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
            for m in container.get("volumeMounts", [])
            if "persistentVolumeClaim" in volumes[m["name"]]}


@pytest.mark.parametrize("name", ["control-plane", "predictor"])
def test_single_replica_services_keep_state_on_a_claim(name) -> None:
    docs = stack()
    dep = objects(docs, "Deployment")[name]
    # One scheduler (one predictor file): the old pod stops before the new one starts.
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    (c,) = pod_spec(dep)["containers"]
    claims = _claims(dep, c)
    assert claims and set(claims.values()) <= set(objects(docs, "PersistentVolumeClaim"))
    args = parse({"command": c["command"]})
    if name == "predictor":
        assert os.path.dirname(args.state) in claims, "--state is not on the claim"
    # Its drain (--grace) ends before the kubelet's SIGKILL.
    assert args.grace < pod_spec(dep).get("terminationGracePeriodSeconds", 30)


def test_workers_scale_and_register_under_their_own_names() -> None:
    for gpu in (False, True):
        for name, c, args in astraea_containers(stack(gpu)):
            if c["command"][0] != "astraea-worker":
                continue
            assert args.name is None, f"{name}: a fixed --name collides across replicas"
            assert not c.get("ports"), f"{name}: a worker serves no port"
    assert objects(stack(), "Deployment")["worker"]["spec"]["replicas"] >= 2


def test_worker_deployments_do_not_share_pods() -> None:
    deps = objects(stack(gpu=True), "Deployment")
    for a, da in deps.items():
        for b, db in deps.items():
            if a != b:
                assert not selects(da["spec"]["selector"], pod_labels(db)), (a, b)


def test_gateway_autoscales_on_cpu_against_a_cpu_request() -> None:
    docs = stack()
    (hpa,) = objects(docs, "HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    (c,) = pod_spec(objects(docs, "Deployment")["gateway"])["containers"]
    assert c["resources"]["requests"]["cpu"], "utilisation is measured against the request"
    assert hpa["spec"]["minReplicas"] >= 1


def test_gpu_worker_runs_vllm_on_one_gpu_with_the_model_from_a_claim() -> None:
    docs = documents(GPU)
    dep = objects(docs, "Deployment")["gpu-worker"]
    (c,) = pod_spec(dep)["containers"]
    args = parse({"command": c["command"]})
    assert args.backend == "vllm" and c["image"] == "astraea:gpu"
    for part in ("requests", "limits"):
        assert c["resources"][part]["nvidia.com/gpu"] == 1, part
    claims = _claims(dep, c)
    assert args.model in claims, "--model is not on a PersistentVolumeClaim"
    assert claims[args.model] in objects(stack(), "PersistentVolumeClaim")
    # The gateway renders prompts with the same model's tokenizer.
    gw = objects(stack(), "Deployment")["gateway"]
    (gc,) = pod_spec(gw)["containers"]
    assert _claims(gw, gc)[parse({"command": gc["command"]}).tokenizer] == claims[args.model]
    for kind in ("readinessProbe", "livenessProbe"):
        assert c[kind]["exec"]["command"][0] == "python3", kind


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_worker_exec_probe_tells_a_stopped_process(stopped) -> None:
    # The probe's own code, pointed at a real process here instead of the container's PID 1.
    (c,) = pod_spec(objects(documents(GPU), "Deployment")["gpu-worker"])["containers"]
    code = c["livenessProbe"]["exec"]["command"][-1]
    assert "/proc/1/stat" in code
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        if stopped:
            os.kill(target.pid, signal.SIGSTOP)
            # The state shows T once the kernel has stopped it.
            for _ in range(100):
                if open(f"/proc/{target.pid}/stat").read().rsplit(")", 1)[1].split()[0] in "Tt":
                    break
                subprocess.run(["sleep", "0.05"])
        probe = code.replace("/proc/1/stat", f"/proc/{target.pid}/stat")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
        assert (done.returncode != 0) == stopped, done.stderr
    finally:
        target.kill()
        target.wait()


# --- network policies --------------------------------------------------------------------------

def allowed(docs: list[dict], src: dict, dst: dict, port: int) -> bool:
    """Whether a pod labelled `src` may open a TCP connection to a pod labelled `dst` on
    `port` in the namespace: the source's egress and the destination's ingress must both allow
    it (a pod no policy selects for a direction is open in that direction)."""
    policies = objects(docs, "NetworkPolicy").values()

    def side(labels: dict, peer: dict, direction: str, key: str) -> bool:
        chosen = [p["spec"] for p in policies if direction in p["spec"]["policyTypes"]
                  and selects(p["spec"]["podSelector"], labels)]
        if not chosen:
            return True
        for spec in chosen:
            for rule in spec.get(direction.lower(), []):
                peers = rule.get(key)
                ports = [p["port"] for p in rule.get("ports", [])]
                if ports and port not in ports:
                    continue
                if peers is None or any("podSelector" in p and "namespaceSelector" not in p
                                        and selects(p["podSelector"], peer) for p in peers):
                    return True
        return False

    return side(src, dst, "Egress", "to") and side(dst, src, "Ingress", "from")


def test_network_policies_allow_the_streams_the_stack_needs_and_nothing_more() -> None:
    docs = stack(gpu=True)
    pods = {name: pod_labels(dep) for name, dep in objects(docs, "Deployment").items()}
    client, stranger = {"astraea.io/agent-client": "true"}, {"app": "something-else"}
    cp, pred, gw, col = 50051, 50071, 8000, 4317
    # Workers dial the control plane (the stream is theirs); nothing dials a worker.
    for worker in ("worker", "gpu-worker"):
        assert allowed(docs, pods[worker], pods["control-plane"], cp), worker
        assert allowed(docs, pods[worker], pods["collector"], col), worker
        assert not allowed(docs, pods[worker], pods["predictor"], pred), worker
        for other in (*pods.values(), client, stranger):
            for port in (cp, pred, gw, col, 8080):
                assert not allowed(docs, other, pods[worker], port), (worker, other, port)
    assert allowed(docs, pods["gateway"], pods["control-plane"], cp)
    assert allowed(docs, client, pods["control-plane"], cp)
    assert not allowed(docs, stranger, pods["control-plane"], cp)
    # The predictor: the control plane only.
    assert allowed(docs, pods["control-plane"], pods["predictor"], pred)
    for other in ("gateway", "collector", "worker"):
        assert not allowed(docs, pods[other], pods["predictor"], pred), other
    # The gateway is the front door; the collector takes OTLP from the namespace.
    assert allowed(docs, stranger, pods["gateway"], gw)
    assert not allowed(docs, stranger, pods["gateway"], cp)
    assert allowed(docs, pods["control-plane"], pods["collector"], col)


@pytest.mark.parametrize("gpu", [False, True], ids=["base", "gpu"])
def test_every_astraea_pod_serves_metrics_where_its_annotations_say(gpu) -> None:
    docs = stack(gpu)
    policy = objects(docs, "NetworkPolicy")["metrics"]["spec"]
    for name, c, args in astraea_containers(docs):
        dep = objects(docs, "Deployment")[name]
        assert (args.metrics_host, args.metrics_port) == ("0.0.0.0", 9464), name
        if "listen" in vars(args):  # a worker declares no port (see the test above)
            named = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert named["metrics"] == args.metrics_port, name
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true", name
        assert int(notes["prometheus.io/port"]) == args.metrics_port, name
        assert notes["prometheus.io/path"] == "/metrics", name
        # The metrics policy selects the pod and opens that port (only that one).
        assert selects(policy["podSelector"], pod_labels(dep)), name
        (rule,) = policy["ingress"]
        assert [p["port"] for p in rule["ports"]] == [args.metrics_port], name


SHARED = K8S / "overlays" / "shared-sessions"


def _json_patch(doc: dict, ops: list[dict]) -> dict:
    """The JSON-patch ops the overlay uses (replace; add, `-` appending) applied to `doc`."""
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = op["path"].strip("/").split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if op["op"] == "add" and last == "-":
            node.append(op["value"])
        else:
            assert op["op"] in ("add", "replace"), op
            node[int(last) if isinstance(node, list) else last] = op["value"]
    return doc


def test_gateways_share_state_only_through_a_database() -> None:
    """In memory, replicas share no stored Response or session: the base runs one. The
    overlay gives every replica the same PostgreSQL, its URL from a generated Secret file."""
    base = stack()
    gw, hpa = objects(base, "Deployment")["gateway"], objects(base, "HorizontalPodAutoscaler")
    (c,) = pod_spec(gw)["containers"]
    args = parse({"command": c["command"]})
    assert not (args.database or args.database_file or args.state_dir)
    assert gw["spec"]["replicas"] == 1
    assert (hpa["gateway"]["spec"]["minReplicas"], hpa["gateway"]["spec"]["maxReplicas"]) == (1, 1)

    k = kustomization(SHARED)
    assert "../../base" in k["resources"]
    patches = {p["target"]["kind"]: yaml.safe_load(p["patch"]) for p in k["patches"]}
    gw = _json_patch(gw, patches["Deployment"])
    (c,) = pod_spec(gw)["containers"]
    args = parse({"command": c["command"]})
    assert args.database_file and args.database_file.startswith(SECRETS_DIR)
    secret, key = mounted_secrets(gw, c)[args.database_file]
    (gen,) = [g for g in k["secretGenerator"] if g["name"] == secret]
    (path,) = [f.split("=", 1)[1] for f in gen["files"] if f.startswith(f"{key}=")]
    rel = (SHARED / path).relative_to(ROOT).as_posix()
    assert subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT).returncode == 0, \
        f"{rel} (the database URL, a password) is not ignored by git"
    scaled = _json_patch(hpa["gateway"], patches["HorizontalPodAutoscaler"])
    assert scaled["spec"]["minReplicas"] >= 2 and gw["spec"]["replicas"] >= 2
