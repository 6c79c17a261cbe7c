"""The predictor service over real gRPC on loopback, and its pure parts (step-time fit, state
files). Each server listens on 127.0.0.1 port 0 and is stopped by its fixture."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random

import grpc
import pytest

from astraea.estimators import PRIOR_API_S, PRIOR_OUTPUT_TOKENS, OnlineEstimator
from astraea.plan import StepTiming
from astraea.profile import load_profile
from astraea.v1 import common_pb2, predictor_pb2, predictor_pb2_grpc
from predictor_svc.limits import PredictorLimits
from predictor_svc.server import MAX_BATCH, serve
from predictor_svc.state import PredictorState, StateError, load_state, save_state
from predictor_svc.step_time import StepTimeModel

PRIOR = predictor_pb2.ESTIMATE_SOURCE_PRIOR
MODEL = predictor_pb2.ESTIMATE_SOURCE_MODEL
# Known step-time coefficients for the fit tests (ms): far from every built-in profile's.
C_MS, A_MS, K_MS = 7.5, 0.031, 2.2e-4


@pytest.fixture
def start_server(request):
    """Start a predictor (gptj-6b-a100) and return (server, stub); stopped at teardown."""

    def _start(state_path=None):
        server = serve("127.0.0.1:0", "gptj-6b-a100", state_path, max_workers=4)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")

        def _stop():
            channel.close()
            server.stop(None).wait()

        request.addfinalizer(_stop)
        return server, predictor_pb2_grpc.PredictorServiceStub(channel)

    return _start


@pytest.fixture
def stub(start_server):
    return start_server()[1]


def ereq(job_id="j1", category="qa", segment_index=1, context_tokens=1000, new_tokens=50,
         elapsed_api_s=0.0) -> predictor_pb2.EstimateRequest:
    return predictor_pb2.EstimateRequest(
        job_id=job_id, category=category, segment_index=segment_index,
        context_tokens=context_tokens, new_tokens=new_tokens, elapsed_api_s=elapsed_api_s)


def estimate(stub, *reqs) -> list[predictor_pb2.Estimate]:
    return list(stub.Estimate(predictor_pb2.EstimateBatchRequest(requests=list(reqs))).estimates)


def probe(stub) -> list[predictor_pb2.Estimate]:
    """A fixed set of estimates touching every learned quantity."""
    return estimate(stub, ereq("a", "qa", 0, 0, 300), ereq("b", "qa", 1, 1500, 40, 0.5),
                    ereq("c", "image", 2, 800, 10, 3.0), ereq("d", "never-seen", 0, 0, 10))


def step_samples(n=64, seed=0, c=C_MS, a=A_MS, k=K_MS) -> list[common_pb2.StepTiming]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens = rng.randint(1, 384)
        ctx = rng.randint(0, 200_000)
        out.append(common_pb2.StepTiming(step_index=i, tokens=tokens, decode_tokens=1,
                                         context_tokens_read=ctx,
                                         duration_s=(c + a * tokens + k * ctx) / 1e3))
    return out


def learn_everything(stub) -> None:
    rng = random.Random(1)
    stub.Observe(predictor_pb2.ObserveRequest(
        api_calls=[predictor_pb2.ApiObservation(category=cat, duration_s=rng.lognormvariate(mu, 1))
                   for cat, mu in (("qa", -0.5), ("image", 3.0)) for _ in range(40)],
        outputs=[predictor_pb2.OutputObservation(category="qa", segment_index=i % 3,
                                                 output_tokens=rng.randint(10, 300))
                 for i in range(30)],
        steps=step_samples(),
    ))


# --- over gRPC: estimates -------------------------------------------------------------------
def test_estimates_before_any_observation_come_from_the_profile_and_prior(stub, gptj):
    (e,) = estimate(stub, ereq("j1", "qa", 1, 1000, 50, 0.25))
    assert e.job_id == "j1" and e.source == PRIOR
    assert e.output_tokens == PRIOR_OUTPUT_TOKENS
    assert e.api_total_s == PRIOR_API_S
    assert e.api_remaining_s == pytest.approx(PRIOR_API_S - 0.25)
    # Scheduler.predicted_compute_s's formula, on the seeding profile.
    expected = gptj.prefill_time_s(50, 1000) + PRIOR_OUTPUT_TOKENS * gptj.step_time_s(1, 1050)
    assert e.compute_s == pytest.approx(expected, rel=1e-12)


def test_estimates_come_back_in_request_order(stub):
    ids = [f"job-{i}" for i in range(50)]
    assert [e.job_id for e in estimate(stub, *(ereq(i) for i in ids))] == ids


def test_api_estimates_move_to_the_observed_distribution(stub):
    durations = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 20.0]
    stub.Observe(predictor_pb2.ObserveRequest(
        api_calls=[predictor_pb2.ApiObservation(category="tts", duration_s=d) for d in durations]))
    e0, e1, e2 = estimate(stub, ereq("a", "tts"), ereq("b", "tts", elapsed_api_s=4.5),
                          ereq("c", "tts", elapsed_api_s=50.0))
    assert e0.source == MODEL
    assert e0.api_total_s == pytest.approx(sum(durations) / len(durations))
    assert e0.api_remaining_s == pytest.approx(e0.api_total_s)  # nothing elapsed yet
    # E[T − e | T > e]: the calls longer than 4.5 s are 5, 6, 7 and 20 → mean 9.5, minus 4.5.
    assert e1.api_remaining_s == pytest.approx(9.5 - 4.5)
    assert e2.api_remaining_s == 0.0  # longer than anything seen: assume it ends now


def test_unknown_category_borrows_the_pooled_window(stub):
    stub.Observe(predictor_pb2.ObserveRequest(
        api_calls=[predictor_pb2.ApiObservation(category="qa", duration_s=2.0)] * 8))
    (e,) = estimate(stub, ereq(category="brand-new"))
    assert e.api_total_s == pytest.approx(2.0) and e.source == MODEL


def test_output_length_estimates_learn(stub):
    outs = [predictor_pb2.OutputObservation(category="math", segment_index=0, output_tokens=t)
            for t in (100, 200, 300, 400)]
    outs += [predictor_pb2.OutputObservation(category="math", segment_index=3, output_tokens=10)
             for _ in range(4)]
    stub.Observe(predictor_pb2.ObserveRequest(outputs=outs))
    first, later, other = estimate(stub, ereq("a", "math", 0), ereq("b", "math", 5),
                                   ereq("c", "chatbot", 0))
    assert first.output_tokens == pytest.approx(250.0) and first.source == MODEL
    assert later.output_tokens == pytest.approx(10.0)
    assert other.output_tokens == pytest.approx((1000 + 40) / 8)  # all jobs' mean


def test_step_time_fit_recovers_known_coefficients_over_grpc(start_server):
    server, stub = start_server()
    stub.Observe(predictor_pb2.ObserveRequest(steps=step_samples()))
    fit = server.predictor._steps.fitted
    assert fit is not None
    assert fit.c_ms == pytest.approx(C_MS, rel=0.01)
    assert fit.a_ms_per_token == pytest.approx(A_MS, rel=0.01)
    assert fit.k_ms_per_context_token == pytest.approx(K_MS, rel=0.01)
    (e,) = estimate(stub, ereq("j", "qa", 1, 1000, 50))
    decode = (C_MS + A_MS + K_MS * 1050) / 1e3
    prefill = (C_MS + A_MS * 50 + K_MS * 1000) / 1e3
    assert e.source == MODEL
    assert e.compute_s == pytest.approx(prefill + PRIOR_OUTPUT_TOKENS * decode, rel=0.01)


# --- over gRPC: state -----------------------------------------------------------------------
def test_save_then_load_into_a_fresh_server_reproduces_estimates(start_server, tmp_path):
    path = str(tmp_path / "state.json")
    _, stub = start_server(state_path=path)
    learn_everything(stub)
    before = probe(stub)
    size = stub.SaveState(predictor_pb2.SaveStateRequest()).size_bytes
    assert size == (tmp_path / "state.json").stat().st_size > 0

    other = str(tmp_path / "other.json")
    _, fresh = start_server(state_path=other)
    assert probe(fresh) != before
    (tmp_path / "other.json").write_bytes((tmp_path / "state.json").read_bytes())
    fresh.LoadState(predictor_pb2.LoadStateRequest())  # its own file, now the saved state
    assert probe(fresh) == before
    # ... and so does a server started with the file as its state.
    _, started = start_server(state_path=path)
    assert probe(started) == before


def test_load_of_a_missing_or_corrupt_file_is_refused_and_keeps_the_state(start_server,
                                                                          tmp_path):
    _, stub = start_server(state_path=str(tmp_path / "state.json"))
    learn_everything(stub)
    before = probe(stub)
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadState(predictor_pb2.LoadStateRequest())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "not found" in err.value.details()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadState(predictor_pb2.LoadStateRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid JSON" in err.value.details()
    assert probe(stub) == before


@pytest.mark.parametrize("rpc", ["SaveState", "LoadState"])
@pytest.mark.parametrize("path", ["../../etc/passwd", "/tmp/x.json", "state.json"])
def test_state_calls_take_no_path_from_the_network(start_server, tmp_path, rpc, path):
    """A caller cannot choose a file to write or read, nor learn whether one exists: any
    path is refused the same way, and nothing is written."""
    _, stub = start_server(state_path=str(tmp_path / "state.json"))
    req = (predictor_pb2.SaveStateRequest(path=path) if rpc == "SaveState"
           else predictor_pb2.LoadStateRequest(path=path))
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{rpc}Request.path must be empty" in err.value.details()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rpc", ["SaveState", "LoadState"])
def test_state_calls_need_a_state_file(stub, rpc):
    req = (predictor_pb2.SaveStateRequest() if rpc == "SaveState"
           else predictor_pb2.LoadStateRequest())
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "without a state file (--state)" in err.value.details()


# --- over gRPC: bad input -------------------------------------------------------------------
def api(cat="qa", d=1.0):
    return predictor_pb2.ApiObservation(category=cat, duration_s=d)


def out(cat="qa", t=10):
    return predictor_pb2.OutputObservation(category=cat, segment_index=0, output_tokens=t)


def step(tokens=10, decode=1, ctx=100, d=0.01):
    return common_pb2.StepTiming(tokens=tokens, decode_tokens=decode, context_tokens_read=ctx,
                                 duration_s=d)


BAD_OBSERVE = {
    "negative api duration": ([api(), api(d=-1.0)], [], [], "api_calls[1].duration_s"),
    "nan api duration": ([api(d=math.nan)], [], [], "api_calls[0].duration_s"),
    "absurd api duration": ([api(d=1e6)], [], [], "api_calls[0].duration_s is 1000000.0: "
                            f"at most {PredictorLimits.max_api_duration_s:g}"),
    "long api category": ([api(cat="c" * 257)], [], [], "api_calls[0].category has 257"),
    "absurd step duration": ([], [], [step(d=1e6)], "steps[0].duration_s"),
    "infinite api duration": ([api(d=math.inf)], [], [], "api_calls[0].duration_s"),
    "empty api category": ([api(), api(), api(cat="")], [], [], "api_calls[2].category"),
    "empty output category": ([api()], [out(), out(cat="")], [], "outputs[1].category"),
    "negative step duration": ([api()], [out()], [step(d=-0.5)], "steps[0].duration_s"),
    "nan step duration": ([], [], [step(), step(d=math.nan)], "steps[1].duration_s"),
    "step with no tokens": ([], [], [step(tokens=0, decode=0)], "steps[0].tokens"),
    "more decodes than tokens": ([], [], [step(tokens=2, decode=3)], "steps[0].decode_tokens"),
    "empty batch": ([], [], [], "ObserveRequest"),
    "oversized batch": ([api()] * (MAX_BATCH + 1), [], [], "at most"),
}


@pytest.fixture
def learned_stub(stub):
    learn_everything(stub)
    return stub


@pytest.mark.parametrize("case", list(BAD_OBSERVE))
def test_bad_observations_are_rejected_whole(learned_stub, case):
    apis, outs, steps, field = BAD_OBSERVE[case]
    before = probe(learned_stub)
    with pytest.raises(grpc.RpcError) as err:
        learned_stub.Observe(predictor_pb2.ObserveRequest(api_calls=apis, outputs=outs,
                                                          steps=steps))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert probe(learned_stub) == before  # the valid elements before the bad one were not kept


def test_a_burst_of_fake_durations_moves_an_estimate_by_a_bounded_factor(stub):
    """2,000 valid-looking 3,000-s observations after 100 real 2-s ones: each counts at most
    clip_factor x the category's mean, so the estimate ends at most 10x where it was."""
    stub.Observe(predictor_pb2.ObserveRequest(api_calls=[api("search", 2.0)] * 100))
    (e,) = estimate(stub, ereq(category="search"))
    assert e.api_total_s == pytest.approx(2.0)
    for _ in range(4):
        stub.Observe(predictor_pb2.ObserveRequest(api_calls=[api("search", 3000.0)] * 500))
    (e,) = estimate(stub, ereq(category="search"))
    assert 2.0 < e.api_total_s <= PredictorLimits.clip_factor * 2.0 + 1e-9
    # Another category is not touched.
    stub.Observe(predictor_pb2.ObserveRequest(api_calls=[api("db", 1.0)] * 40))
    (d,) = estimate(stub, ereq(category="db"))
    assert d.api_total_s == pytest.approx(1.0)


def test_a_burst_of_calls_gets_answers_or_resource_exhausted_never_cancelled():
    """3,000 Estimate calls at once on 4 threads and 16 concurrent calls: each is answered or
    refused with RESOURCE_EXHAUSTED; none is dropped as CANCELLED by gRPC's pending queue."""
    server = serve("127.0.0.1:0", "gptj-6b-a100", limits=PredictorLimits(max_concurrent_rpcs=16,
                                                                         max_workers=4))

    async def burst():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            req = predictor_pb2.EstimateBatchRequest(requests=[ereq(f"j{i}") for i in range(20)])

            async def one():
                try:
                    await stub.Estimate(req, timeout=120)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    return e.code()
            return collections.Counter(await asyncio.gather(*(one() for _ in range(3000))))
    try:
        codes = asyncio.run(burst())
    finally:
        server.stop(None).wait()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.OK] >= 16 and sum(codes.values()) == 3000


@pytest.mark.parametrize("method", ["Observe", "Estimate"])
def test_an_unparseable_request_is_invalid_argument_and_logged_once(start_server, caplog,
                                                                    method):
    server, _ = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(f"/astraea.v1.PredictorService/{method}")  # raw bytes
        with caplog.at_level("WARNING"), pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid {method} request message" in err.value.details()
    records = [r for r in caplog.records if "unparseable" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None  # one line, no traceback


BAD_ESTIMATE = {
    "negative elapsed": ([ereq(), ereq(elapsed_api_s=-1.0)], "requests[1].elapsed_api_s"),
    "nan elapsed": ([ereq(elapsed_api_s=math.nan)], "requests[0].elapsed_api_s"),
    "infinite elapsed": ([ereq(elapsed_api_s=math.inf)], "requests[0].elapsed_api_s"),
    "empty job id": ([ereq(), ereq(job_id="")], "requests[1].job_id"),
    "empty batch": ([], "EstimateBatchRequest.requests is empty"),
    "oversized batch": ([ereq()] * (MAX_BATCH + 1), f"at most {MAX_BATCH}"),
}


@pytest.mark.parametrize("case", list(BAD_ESTIMATE))
def test_bad_estimate_requests_are_rejected(learned_stub, case):
    reqs, field = BAD_ESTIMATE[case]
    with pytest.raises(grpc.RpcError) as err:
        learned_stub.Estimate(predictor_pb2.EstimateBatchRequest(requests=reqs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_empty_estimate_category_is_served_from_the_pool(learned_stub):
    (e,) = estimate(learned_stub, ereq(category=""))
    assert e.source == MODEL and e.api_total_s > 0


# --- step_time.py ---------------------------------------------------------------------------
def test_seed_answers_exactly_as_the_profile(gptj):
    m = StepTimeModel(gptj)
    assert m.fitted is None
    for tokens, prior in ((0, 0), (1, 0), (383, 10), (384, 500), (1000, 2000)):
        assert m.prefill_time_s(tokens, prior) == gptj.prefill_time_s(tokens, prior)
    assert m.decode_step_s(1500) == gptj.step_time_s(1, 1500)


def test_seed_uses_a_table_profile_table():
    h100 = load_profile("llama3-8b-h100")
    m = StepTimeModel(h100)
    assert m.prefill_time_s(2000, 100) == h100.prefill_time_s(2000, 100)


def test_fit_recovers_coefficients_and_uses_profile_chunking(gptj):
    m = StepTimeModel(gptj)
    for s in step_samples(n=40, seed=3):
        m.observe(s.tokens, s.context_tokens_read, s.duration_s)
    fit = m.fitted
    assert (fit.c_ms, fit.a_ms_per_token, fit.k_ms_per_context_token) == pytest.approx(
        (C_MS, A_MS, K_MS), rel=0.01)
    # 1000 tokens at a 384 budget: chunks of 384, 384, 232, each reading the prior context.
    chunks = [384, 384, 232]
    expected = sum(C_MS + A_MS * t + K_MS * 700 for t in chunks) / 1e3
    assert m.prefill_time_s(1000, 700) == pytest.approx(expected, rel=1e-6)
    assert m.decode_step_s(900) == pytest.approx((C_MS + A_MS + K_MS * 900) / 1e3, rel=1e-6)


def test_fit_follows_the_sliding_window(gptj):
    m = StepTimeModel(gptj, window=32)
    for s in step_samples(n=32, seed=4) + step_samples(n=32, seed=5, c=20.0, a=0.05, k=1e-4):
        m.observe(s.tokens, s.context_tokens_read, s.duration_s)
    assert m.fitted.c_ms == pytest.approx(20.0, rel=0.01)


@pytest.mark.parametrize("kind", ["too few", "constant context", "constant tokens",
                                  "non-physical"])
def test_degenerate_data_keeps_the_seed(gptj, kind):
    m = StepTimeModel(gptj)
    if kind == "too few":
        rows = [(t, t * 100, 0.02) for t in range(1, 6)]
    elif kind == "constant context":
        rows = [(t, 500, (10 + 0.05 * t) / 1e3) for t in range(1, 50)]
    elif kind == "constant tokens":
        rows = [(16, c, (10 + 0.001 * c) / 1e3) for c in range(0, 5000, 100)]
    else:  # time falls as tokens grow: a negative a
        rows = [(t, (t * 37) % 1000, (50 - 0.1 * t) / 1e3) for t in range(1, 50)]
    for row in rows:
        m.observe(*row)
    assert m.fitted is None
    assert m.decode_step_s(1000) == gptj.step_time_s(1, 1000)


def test_a_refused_fit_keeps_the_previous_fit(gptj):
    m = StepTimeModel(gptj, window=40)
    for s in step_samples(n=40, seed=6):
        m.observe(s.tokens, s.context_tokens_read, s.duration_s)
    good = m.fitted
    for _ in range(40):  # the window is now all one point: rank 1
        m.observe(10, 100, 0.5)
    assert m.fitted == good


def test_observe_refuses_bad_samples(gptj):
    m = StepTimeModel(gptj)
    for args in ((-1, 0, 0.1), (1, -1, 0.1), (1, 0, -0.1), (1, 0, math.nan)):
        with pytest.raises(ValueError):
            m.observe(*args)
    assert m.timings == []


# --- state.py -------------------------------------------------------------------------------
def learned_state() -> PredictorState:
    est = OnlineEstimator(window=16)
    rng = random.Random(2)
    for _ in range(40):  # overflows the window, so the kept sums carry subtraction round-off
        est.observe_api("qa", rng.lognormvariate(0, 1))
        est.observe_output_for("qa", rng.randint(0, 2), rng.randint(1, 200))
    est.observe_api("tts", 0.1)
    return PredictorState(est, [StepTiming(10, 100, 0.01), StepTiming(20, 0, 0.02)], "gptj")


def test_state_round_trips_exactly(tmp_path):
    state = learned_state()
    path = tmp_path / "s.json"
    size = save_state(state, path)
    assert size == path.stat().st_size
    loaded = load_state(path)
    assert loaded.step_timings == state.step_timings and loaded.profile == "gptj"
    assert loaded.estimator.export_state() == state.estimator.export_state()
    for cat in ("qa", "tts", "other"):
        for elapsed in (0.0, 0.7, 3.0):
            assert (loaded.estimator.api_remaining_s(cat, elapsed)
                    == state.estimator.api_remaining_s(cat, elapsed))
        assert loaded.estimator.api_mean_s(cat) == state.estimator.api_mean_s(cat)
        assert loaded.estimator.output_tokens_for(cat, 0) == state.estimator.output_tokens_for(cat, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left behind


def test_save_replaces_atomically_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    save_state(learned_state(), path)
    old = path.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("predictor_svc.state.os.replace", boom)
    with pytest.raises(OSError):
        save_state(PredictorState(OnlineEstimator(), []), path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def _mutate(data: dict, case: str) -> dict:
    if case == "wrong format":
        data["format"] = "something-else"
    elif case == "future version":
        data["version"] = 99
    elif case == "missing estimator":
        del data["estimator"]
    elif case == "negative api sample":
        data["estimator"]["api"]["qa"]["samples"][0] = -1.0
    elif case == "too many samples":
        data["estimator"]["api_all"]["samples"] *= 10
    elif case == "bad output key":
        data["estimator"]["outputs"][0]["key"] = [1, 2, 3]
    elif case == "bad step sample":
        data["step_samples"][0] = [10, "x", 0.1]
    return data


@pytest.mark.parametrize("case, words", [
    ("wrong format", "not a predictor state file"),
    ("future version", "unsupported state version 99"),
    ("missing estimator", "missing field 'estimator'"),
    ("negative api sample", "api['qa'].samples[0]"),
    ("too many samples", "exceed the window"),
    ("bad output key", "outputs[0].key"),
    ("bad step sample", "step_samples[0][1]"),
])
def test_corrupt_state_files_raise_a_clear_error(tmp_path, case, words):
    path = tmp_path / "s.json"
    save_state(learned_state(), path)
    path.write_text(json.dumps(_mutate(json.loads(path.read_text()), case)))
    with pytest.raises(StateError) as err:
        load_state(path)
    assert words in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"{trunc", b"\xff\xfe", b"[1, 2]"])
def test_unparseable_state_files_raise_a_clear_error(tmp_path, content):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(StateError, match="not a predictor state file"):
        load_state(path)


def test_missing_state_file_raises_a_clear_error(tmp_path):
    with pytest.raises(StateError, match="state file not found"):
        load_state(tmp_path / "absent.json")
