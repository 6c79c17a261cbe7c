"""Keys, TLS and job ownership over real gRPC on loopback: a caller without the right key gets
UNAUTHENTICATED (logged once per host, no traceback); an impostor worker cannot register and
sees no prompt; one key cannot read or cancel another key's job (NOT_FOUND, as for a missing
job); a client trusting another CA cannot connect; `astraea certs` makes certificates a TLS
server (and mutual TLS) accepts; the predictor refuses an unauthenticated Observe."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from astraea import healthcheck
from astraea.auth import (
    AuthConfigError,
    AuthPolicy,
    ClientCredentials,
    KeyRing,
    ServerTLS,
)
from astraea.client import AgentClient, AstraeaError, AsyncAgentClient
from astraea.profile import load_profile
from astraea.tools.cli.main import main
from astraea.tools.devcerts import make_dev_certs
from astraea.v1 import predictor_pb2, predictor_pb2_grpc
from control_plane.service.context import ServiceConfig
from control_plane.service.predictor_link import PredictorLink
from control_plane.service.server import serve
from predictor_svc.server import serve as serve_predictor
from worker.process import EXIT_FAILED, WorkerProcess
from worker.sim.backend import SimulatedBackend

PROFILE = "gptj-6b-a100"
TIME_SCALE = 0.01
WAIT_S = 30.0  # generous: the machine may be busy
ALICE, BOB, WORKER_TOKEN = "alice-key-0123456789", "bob-key-0123456789", "worker-token-42"
AGENT, WORKERS = "astraea.v1.AgentService", "astraea.v1.WorkerService"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


def _policy() -> AuthPolicy:
    return AuthPolicy({AGENT: KeyRing.parse([f"alice:{ALICE}", f"bob:{BOB}"]),
                       WORKERS: KeyRing.parse([WORKER_TOKEN])})


async def _control_plane(certs, **kw):
    return await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=TIME_SCALE),
                       auth=_policy(), tls=ServerTLS(str(certs.server_cert),
                                                     str(certs.server_key)), **kw)


def _client(certs, port: int, key: str | None, ca=None) -> AsyncAgentClient:
    return AsyncAgentClient(f"127.0.0.1:{port}", timeout=WAIT_S, api_key=key,
                            tls_ca=str(ca or certs.ca))


async def _until(predicate, seconds: float = WAIT_S) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


# --- keys on AgentService ----------------------------------------------------------------------
def test_missing_or_wrong_key_is_unauthenticated_and_logged_once_per_host(certs, caplog):
    asyncio.run(asyncio.wait_for(_missing_or_wrong_key(certs, caplog), 60))


async def _missing_or_wrong_key(certs, caplog):
    cp = await _control_plane(certs)
    try:
        caplog.set_level(logging.WARNING, logger="astraea.auth")
        for key, why in ((None, "no 'authorization: Bearer KEY' metadata"),
                         ("not-a-key", "the key is not accepted")):
            async with _client(certs, cp.port, key) as client:
                for _ in range(3):
                    with pytest.raises(AstraeaError) as err:
                        await client.start_job("j1", category="qa")
                    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
                    assert err.value.message == f"{AGENT} requires a key: {why}"
                with pytest.raises(AstraeaError) as err:  # a streaming call, refused alike
                    await client.run_segment("j1", prompt_text="hi", max_tokens=2)
                assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert not cp.control_plane.registry.jobs  # nothing was started
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 2, [r.getMessage() for r in refusals]  # once per reason
        assert all(r.exc_info is None for r in refusals)
        # The right key works; the health service needs none (probes).
        async with _client(certs, cp.port, ALICE) as client:
            assert await client.start_job("j1", category="qa") == "j1"
        async with grpc.aio.secure_channel(f"127.0.0.1:{cp.port}", grpc.ssl_channel_credentials(
                certs.ca.read_bytes())) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=WAIT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await cp.stop(0)


def test_a_second_key_cannot_read_or_cancel_the_first_keys_job(certs):
    asyncio.run(asyncio.wait_for(_ownership(certs), 60))


async def _ownership(certs):
    cp = await _control_plane(certs)
    try:
        async with _client(certs, cp.port, ALICE) as alice, \
                _client(certs, cp.port, BOB) as bob:
            await alice.start_job("alices", category="qa")
            with pytest.raises(AstraeaError) as missing:
                await bob.get_job("nobodys")
            for call in (bob.get_job("alices"), bob.cancel_job("alices", "mine now"),
                         bob.end_job("alices"), bob.report_tool_start("alices", "search"),
                         bob.run_segment("alices", prompt_text="hi", max_tokens=2)):
                with pytest.raises(AstraeaError) as err:
                    await call
                assert err.value.code is grpc.StatusCode.NOT_FOUND
                # Word for word the answer for a job that does not exist.
                assert err.value.message == missing.value.message.replace("nobodys", "alices")
            status = await alice.get_job("alices")  # untouched, still alice's
            assert status.job_id == "alices"
            assert cp.control_plane.registry.jobs["alices"].finished_unix_s is None
    finally:
        await cp.stop(0)


def test_without_keys_every_caller_is_one_owner(certs):
    async def run():
        cp = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=TIME_SCALE))
        try:
            async with AsyncAgentClient(f"127.0.0.1:{cp.port}", timeout=WAIT_S) as a, \
                    AsyncAgentClient(f"127.0.0.1:{cp.port}", timeout=WAIT_S,
                                     api_key="ignored-key") as b:
                await a.start_job("shared", category="qa")
                assert (await b.get_job("shared")).job_id == "shared"
                await b.cancel_job("shared")
        finally:
            await cp.stop(0)
    asyncio.run(asyncio.wait_for(run(), 60))


# --- workers -----------------------------------------------------------------------------------
def test_an_impostor_worker_cannot_register_and_receives_no_prompt(certs):
    asyncio.run(asyncio.wait_for(_impostor(certs), 90))


def _worker(certs, token: str | None, kv_blocks: int | None = None) -> WorkerProcess:
    backend = SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE, kv_blocks=kv_blocks)
    return WorkerProcess(backend, "w", heartbeat_interval_s=0.1,
                         credentials=ClientCredentials(token, str(certs.ca)))


async def _impostor(certs):
    cp = await _control_plane(certs)
    address = f"127.0.0.1:{cp.port}"
    try:
        async with _client(certs, cp.port, ALICE) as client:
            await client.start_job("j", category="qa")
            segment = asyncio.create_task(client.run_segment(
                "j", prompt_text="the secret prompt", max_tokens=4))
            await _until(lambda: cp.control_plane.registry.jobs["j"].segment is not None)
            # Claiming a huge capacity, without the token and with a wrong one: refused for
            # good (exit 1), never registered, so the waiting segment went nowhere.
            for token in (None, "guessed-token"):
                impostor = _worker(certs, token, kv_blocks=10_000_000)
                assert await impostor.run(address) == EXIT_FAILED
                assert impostor.registrations == 0
                assert impostor.backend.view().running_seqs == 0
            assert not cp.control_plane.registry.workers and not segment.done()
            assert cp.control_plane.registry.jobs["j"].history_worker is None
            # The real worker, with the token, registers and runs it.
            real = _worker(certs, WORKER_TOKEN)
            run = asyncio.create_task(real.run(address))
            result = await segment
            assert len(result.tokens) == 4 and real.registrations == 1
        await cp.stop(2.0)  # a graceful stop tells the worker to leave
        assert await asyncio.wait_for(run, WAIT_S) == 0
    finally:
        await cp.stop(0)


# --- TLS ---------------------------------------------------------------------------------------
def test_a_client_trusting_another_ca_cannot_connect(certs, tmp_path):
    other = make_dev_certs(tmp_path / "other")

    async def run():
        cp = await _control_plane(certs)
        try:
            async with _client(certs, cp.port, ALICE, ca=other.ca) as client:
                with pytest.raises(AstraeaError) as err:
                    await client.start_job("j", category="qa")
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
            # The container probe needs the CA, and no key.
            address = f"127.0.0.1:{cp.port}"
            assert await asyncio.to_thread(healthcheck.main, [address, "--tls-ca",
                                                              str(certs.ca)]) == 0
            assert await asyncio.to_thread(healthcheck.main, [address, "--tls-ca",
                                                              str(other.ca)]) == 1
            # Plaintext against the TLS port fails as well.
            async with AsyncAgentClient(f"127.0.0.1:{cp.port}", timeout=5, api_key=ALICE) as c:
                with pytest.raises(AstraeaError):
                    await c.start_job("j", category="qa")
            assert not cp.control_plane.registry.jobs
        finally:
            await cp.stop(0)
    asyncio.run(asyncio.wait_for(run(), 60))


def test_astraea_certs_output_serves_tls_and_mutual_tls(tmp_path, capsys):
    out_dir = tmp_path / "dev-certs"
    assert main(["certs", str(out_dir), "--host", "agents.internal"]) == 0
    out = capsys.readouterr().out
    paths = {name: str(out_dir / name) for name in ("ca.pem", "server.pem", "server-key.pem",
                                                    "client.pem", "client-key.pem")}
    assert all(p in out for p in paths.values()) and "agents.internal" in out
    assert (out_dir / "server-key.pem").stat().st_mode & 0o077 == 0  # keys: owner only
    # Mutual TLS: the server requires a client certificate signed by the CA.
    pred = serve_predictor("127.0.0.1:0", PROFILE, max_workers=2, tls=ServerTLS(
        paths["server.pem"], paths["server-key.pem"], client_ca=paths["ca.pem"]))
    try:
        with_cert = ClientCredentials(tls_ca=paths["ca.pem"], tls_cert=paths["client.pem"],
                                      tls_key=paths["client-key.pem"])
        with with_cert.channel(f"localhost:{pred.port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=WAIT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with ClientCredentials(tls_ca=paths["ca.pem"]).channel(f"127.0.0.1:{pred.port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=WAIT_S)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        pred.stop(0).wait()


# --- the predictor -----------------------------------------------------------------------------
def test_the_predictor_refuses_an_unauthenticated_observe(certs):
    token = "predictor-token-7"
    pred = serve_predictor("127.0.0.1:0", PROFILE, max_workers=2,
                           auth=AuthPolicy({"astraea.v1.PredictorService":
                                            KeyRing.parse([token])}),
                           tls=ServerTLS(str(certs.server_cert), str(certs.server_key)))
    observe = predictor_pb2.ObserveRequest(api_calls=[
        predictor_pb2.ApiObservation(category="search", duration_s=100.0)] * 50)
    address = f"127.0.0.1:{pred.port}"
    try:
        for creds in (ClientCredentials(tls_ca=str(certs.ca)),
                      ClientCredentials("wrong-token", str(certs.ca))):
            with creds.channel(address) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    predictor_pb2_grpc.PredictorServiceStub(ch).Observe(
                        observe, timeout=WAIT_S, metadata=creds.metadata)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert "requires a key" in err.value.details()
        assert _learned(pred, "search") == 0  # nothing was learned
        # The control plane's link, with the token, is accepted and its observations count.
        asyncio.run(asyncio.wait_for(_link(address, token, certs), 60))
        assert _learned(pred, "search") == 1
    finally:
        pred.stop(0).wait()


def _learned(pred, category: str) -> int:
    return len(pred.predictor._est.api_duration_samples(category))


async def _link(address: str, token: str, certs) -> None:
    link = PredictorLink(address, credentials=ClientCredentials(token, str(certs.ca)),
                         timeout_s=5.0, flush_interval_s=0.02)
    await link.start()
    try:
        link.observe_api("search", 2.0)
        await _until(lambda: link.sent == 1)
        assert link.failures == 0
    finally:
        await link.close()


# --- key files and credentials -----------------------------------------------------------------
def test_key_files_name_owners_and_bad_ones_are_refused_with_their_line(tmp_path):
    ring = KeyRing.parse(["# team keys", "", "alice:k-alice", "k-bare"])
    assert ring.owner("k-alice") == "alice"
    assert ring.owner("k-bare").startswith("key-") and "k-bare" not in ring.owner("k-bare")
    assert ring.owner("k-nobody") is None
    for lines, message in ((["a:k", "b:k"], "line 2: the same key twice"),
                           ([":k"], "line 1: empty name"), (["a:"], "line 1: empty key"),
                           (["k with space"], "printable ASCII without spaces"),
                           (["# only a comment"], "no keys")):
        with pytest.raises(AuthConfigError, match=message):
            KeyRing.parse(lines, "keys.txt")
    with pytest.raises(AuthConfigError, match="cannot read key file"):
        KeyRing.from_file(str(tmp_path / "missing"))
    with pytest.raises(AuthConfigError, match="needs the server's CA"):
        ClientCredentials(tls_cert="c.pem", tls_key="k.pem")
    with pytest.raises(AuthConfigError, match="cannot read TLS CA"):
        AgentClient("127.0.0.1:1", tls_ca=str(tmp_path / "no-ca.pem"))


# --- a secure stack ----------------------------------------------------------------------------
def test_a_secure_stack_runs_every_service_with_tls_and_keys(tmp_path, monkeypatch, capsys):
    import openai

    from astraea.tools.stack import Stack, StackConfig

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE", "ASTRAEA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    cfg = StackConfig(control_plane_listen="127.0.0.1:0", predictor_listen="127.0.0.1:0",
                      time_scale=0.1, workers=1, log_dir=str(tmp_path / "logs"),
                      http_listen="127.0.0.1:0", secure=True)
    with Stack(cfg) as st:
        options = st.client_options()
        assert set(options) == {"api_key", "tls_ca"}
        with AgentClient(st.control_plane_address, timeout=WAIT_S, **options) as client:
            job = client.start_job(category="qa")
            assert len(client.run_segment(job, prompt_token_ids=[1] * 8, max_tokens=3).tokens) == 3
            client.end_job(job)
        with AgentClient(st.control_plane_address, timeout=WAIT_S,
                         tls_ca=options["tls_ca"]) as client:
            with pytest.raises(AstraeaError) as err:
                client.start_job(category="qa")
            assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
        # A researcher replays a trace against the secure stack with the key it printed.
        replay = ["replay", "infercept", "--jobs", "3", "--qps", "20", "--time-scale", "0.05",
                  "--control-plane", st.control_plane_address, "--tls-ca", options["tls_ca"]]
        assert main([*replay, "--api-key", options["api_key"]]) == 0
        assert "3/3 jobs completed" in capsys.readouterr().err
        assert main(replay) == 1  # no key: every job refused, and said so
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        # The gateway is a client of the control plane too, with its own key, over TLS.
        with openai.OpenAI(base_url=f"{st.http_address}/v1", api_key="unused", max_retries=0,
                           timeout=60) as oa:
            reply = oa.chat.completions.create(model=cfg.served_model, max_tokens=3, messages=[
                {"role": "user", "content": "Say hello."}])
            assert reply.usage.completion_tokens == 3
        cp_log = st.log_files["control-plane"]
        # The control plane reached the predictor with its token, over TLS.
        for _ in range(int(WAIT_S / 0.1)):
            if "predictor connected" in cp_log.read_text():
                break
            time.sleep(0.1)
        logs = {name: path.read_text() for name, path in st.log_files.items()}
    assert "predictor connected" in logs["control-plane"]
    # Its token was accepted (a call that misses its deadline on a loaded host may still log
    # a short outage: that is not what this test is about).
    assert "unauthenticated call refused" not in logs["predictor"]
    assert not any("is unauthenticated" in text for text in logs.values()), logs
    assert logs["control-plane"].count("unauthenticated call refused") == 1  # the keyless client
    assert st.exit_codes == {"control-plane": 0, "predictor": 0, "worker-w1": 0,
                             "gateway": 0}


@pytest.mark.parametrize("module, serving, flags", [
    ("control_plane.service.server", "control plane serving",
     ("--api-key-file", "--worker-token-file", "--tls-cert")),
    ("predictor_svc.server", "predictor serving", ("--token-file", "--tls-cert"))])
def test_a_service_without_keys_warns_in_one_line_at_start(module, serving, flags):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", module, "--listen", "127.0.0.1:0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if serving in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=WAIT_S)
    warnings = [line for line in lines if "is unauthenticated" in line]
    assert len(warnings) == 1, lines
    assert all(flag in warnings[0] for flag in flags), warnings


def test_astraea_up_is_secure_unless_its_config_or_flag_says_otherwise(tmp_path):
    from astraea.tools.cli.main import build_parser
    from astraea.tools.cli.stack import _stack_config
    from astraea.tools.stack import StackConfig, StackError

    toml = tmp_path / "stack.toml"
    toml.write_text("workers = 1\n")
    up = ["up", "--config", str(toml)]
    assert _stack_config(build_parser().parse_args(up), defaults={"secure": True}).secure
    assert not _stack_config(build_parser().parse_args([*up, "--insecure"]),
                             defaults={"secure": True}).secure
    toml.write_text("workers = 1\nsecure = false\n")
    assert not _stack_config(build_parser().parse_args(up), defaults={"secure": True}).secure
    assert not StackConfig().secure  # the library's default: loopback harnesses
    with pytest.raises(StackError, match="set secure = false"):
        StackConfig(secure=True, connect_control_plane="127.0.0.1:50051")
