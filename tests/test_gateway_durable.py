"""The gateway's state in the durable store (`--state-dir` / `--database`): stored Responses
and named chat sessions survive a gateway restart and are shared by gateways side by side.

A live stack (control plane and one simulated worker, as processes) and gateway processes
started here on one state, SQLite in a temporary directory or a real PostgreSQL database
(tests/postgres_server.py), driven by the official `openai` SDK. A SQLite state belongs to one
process at a time, so gateways side by side share a PostgreSQL database. An idle simulated worker
keeps a job's KV over its API wait, so a continued session reports its whole previous
context as cached."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from astraea.store import open_store
from astraea.tools.stack import Stack, StackConfig
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from gateway.response_store import StoredResponse, StoreResponseStore

ROOT = Path(__file__).resolve().parents[1]
MODEL = "astraea"
RULES = "You are terse."
HELLO = [{"role": "user", "content": "Say hello."}]
WAIT_S = 60.0  # generous: the machine may be busy


@pytest.fixture(scope="module")
def stack():
    cfg = StackConfig(workers=1, time_scale=0.1, control_plane_listen="127.0.0.1:0",
                      predictor=False)
    with Stack(cfg) as st:
        yield st


@pytest.fixture(scope="module")
def tokenizer() -> str:
    from worker.vllm.tiny_model import resolve_tokenizer

    return resolve_tokenizer(None)



@pytest.fixture(params=["sqlite", "postgresql"])
def state(request, tmp_path) -> list[str]:
    """The gateway flags naming a fresh state."""
    if request.param == "sqlite":
        return ["--state-dir", str(tmp_path / "state")]
    return ["--database",
            request.getfixturevalue("pg_server").create_database(f"g_{uuid.uuid4().hex[:12]}")]


@pytest.fixture
def shared_state(pg_server) -> list[str]:
    """A fresh PostgreSQL database, for gateways side by side."""
    return ["--database", pg_server.create_database(f"g_{uuid.uuid4().hex[:12]}")]


@pytest.fixture
def jobs(stack):
    with grpc.insecure_channel(stack.control_plane_address) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        yield lambda job_id: stub.GetJob(agent_pb2.GetJobRequest(job_id=job_id), timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gateway_cmd(tokenizer: str, control_plane: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway.server", "--model", MODEL, "--tokenizer", tokenizer,
            "--control-plane", control_plane, *extra]


@contextlib.contextmanager
def gateway(stack, tokenizer: str, state: list[str], *extra: str) -> Iterator[openai.OpenAI]:
    """A gateway process on `state`, and an SDK client of it; SIGTERM on leaving."""
    port = _free_port()
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while it runs
    proc = subprocess.Popen(
        _gateway_cmd(tokenizer, stack.control_plane_address, "--listen", f"127.0.0.1:{port}",
                     *state, *extra),
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the gateway exited: {log.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.1)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=WAIT_S) as client:
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _chat(client, messages, sid: str | None = None, **kw):
    headers = {"X-Session-ID": sid} if sid else None
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=kw.pop("max_tokens", 6),
        extra_headers=headers, **kw)
    return raw.parse(), raw.headers


def _respond(client, **kw):
    raw = client.responses.with_raw_response.create(model=MODEL, instructions=RULES, **kw)
    return raw.parse(), raw.headers


def _then(history: list[dict], reply, text: str) -> list[dict]:
    return [*history, reply.choices[0].message.model_dump(exclude_none=True),
            {"role": "user", "content": text}]


def _error(e: openai.APIStatusError) -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def _wait_finished(jobs, job_id: str, seconds: float = WAIT_S) -> None:
    deadline = time.monotonic() + seconds
    while jobs(job_id).state != common_pb2.JOB_STATE_FINISHED:
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        time.sleep(0.1)


def test_responses_and_named_sessions_go_on_across_a_gateway_restart(stack, tokenizer, state,
                                                                      jobs):
    sid = f"agent-{uuid.uuid4().hex[:8]}"
    with gateway(stack, tokenizer, state) as client:
        first, h1 = _respond(client, input="Say hello.", max_output_tokens=6)
        chat1, c1 = _chat(client, HELLO, sid)
        not_stored, _ = _respond(client, input="Hi.", store=False, max_output_tokens=2)
    # A new gateway process on the same state: the stored responses and sessions are there,
    # and their jobs kept their KV over the restart: only the new input is prefilled.
    with gateway(stack, tokenizer, state) as client:
        assert client.responses.retrieve(first.id).output_text == first.output_text
        second, h2 = _respond(client, input="And goodbye.", previous_response_id=first.id,
                              max_output_tokens=6)
        assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
        assert jobs(h1["x-astraea-job-id"]).segment_index == 2
        assert second.usage.input_tokens_details.cached_tokens == first.usage.total_tokens

        chat2, c2 = _chat(client, _then(HELLO, chat1, "And goodbye."), sid)
        assert c2["x-session-id"] == sid
        assert c2["x-astraea-job-id"] == c1["x-astraea-job-id"]
        assert chat2.usage.prompt_tokens_details.cached_tokens == chat1.usage.total_tokens

        # A fork from the first response cannot use the job (it holds the second turn).
        fork, hf = _respond(client, input="Something else.", previous_response_id=first.id,
                            max_output_tokens=4)
        assert hf["x-astraea-job-id"] != h1["x-astraea-job-id"]
        assert fork.usage.input_tokens_details.cached_tokens == 0
        third, h3 = _respond(client, input="Once more.", previous_response_id=second.id,
                             max_output_tokens=4)
        assert h3["x-astraea-job-id"] == h1["x-astraea-job-id"]
        assert third.usage.input_tokens_details.cached_tokens == second.usage.total_tokens

        with pytest.raises(openai.NotFoundError) as e:
            client.responses.create(model=MODEL, input="Hi.", previous_response_id="resp_nope")
        err = _error(e.value)
        assert err["param"] == "previous_response_id" and "resp_nope" in err["message"]
        assert err["code"] == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):  # store=false: never written
            client.responses.retrieve(not_stored.id)


def test_a_named_session_goes_on_on_another_gateway(stack, tokenizer, shared_state, jobs):
    state = shared_state
    with gateway(stack, tokenizer, state) as a, gateway(stack, tokenizer, state) as b:
        sid = f"agent-{uuid.uuid4().hex[:8]}"
        first, h1 = _chat(a, HELLO, sid)
        history = _then(HELLO, first, "And goodbye.")
        second, h2 = _chat(b, history, sid)
        assert h2["x-session-id"] == sid
        assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
        assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
        # Back on the first gateway, whose own copy of the session is a turn behind: the
        # stored state is what counts.
        history = _then(history, second, "Thanks.")
        third, h3 = _chat(a, history, sid)
        assert h3["x-astraea-job-id"] == h1["x-astraea-job-id"]
        assert third.usage.prompt_tokens_details.cached_tokens == second.usage.total_tokens
        assert jobs(h1["x-astraea-job-id"]).segment_index == 3

        # One request at a time per session, whichever gateway it comes to: the headers of
        # a streamed turn arrive once it holds the session, and its segment is long.
        history = _then(history, third, "Tell me a long story.")
        with a.chat.completions.with_streaming_response.create(
                model=MODEL, messages=history, max_tokens=1500, stream=True,
                extra_headers={"X-Session-ID": sid}) as streaming:
            with pytest.raises(openai.ConflictError) as e:
                _chat(b, history, sid)
            err = _error(e.value)
            assert err["code"] == "session_busy" and sid in err["message"]
            for _ in streaming.iter_lines():
                pass
        assert jobs(h1["x-astraea-job-id"]).segment_index == 4

        # A prompt that extends an older turn, not the job's transcript, is never answered
        # from the job's KV: a new job, prefilled whole.
        stale = _then(HELLO, first, "Something else.")
        fresh, h4 = _chat(b, stale, sid)
        assert h4["x-astraea-job-id"] != h1["x-astraea-job-id"]
        assert fresh.usage.prompt_tokens_details.cached_tokens == 0
        _wait_finished(jobs, h1["x-astraea-job-id"])

        # Closing on one gateway ends the job for all: the next request starts a new one.
        closing = _then(stale, fresh, "Bye.")
        _chat(a, closing, sid, extra_body={"nvext": {"session_control": {"action": "close"}}})
        _wait_finished(jobs, h4["x-astraea-job-id"])
        after, h5 = _chat(b, _then(closing, fresh, "Hello again."), sid)
        assert h5["x-astraea-job-id"] not in (h1["x-astraea-job-id"], h4["x-astraea-job-id"])
        assert after.usage.prompt_tokens_details.cached_tokens == 0


def test_an_idle_session_ends_its_job_whichever_gateway_served_it(stack, tokenizer,
                                                                  shared_state, jobs):
    state, idle = shared_state, ("--session-idle-s", "1")
    with gateway(stack, tokenizer, state, *idle) as a, \
            gateway(stack, tokenizer, state, *idle) as b:
        sid = f"agent-{uuid.uuid4().hex[:8]}"
        first, h1 = _chat(a, HELLO, sid)
        _wait_finished(jobs, h1["x-astraea-job-id"])
        second, h2 = _chat(b, _then(HELLO, first, "Still there?"), sid)
        assert h2["x-astraea-job-id"] != h1["x-astraea-job-id"]
        assert second.usage.prompt_tokens_details.cached_tokens == 0


def test_a_state_that_cannot_be_opened_fails_startup(stack, tokenizer, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with socket.socket() as s:  # a port no PostgreSQL listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"postgresql://astraea@127.0.0.1:{s.getsockname()[1]}/none"
    for flags, says in [(["--state-dir", str(not_a_dir)], "not a directory"),
                        (["--database", nowhere], "cannot connect")]:
        out = subprocess.run(_gateway_cmd(tokenizer, stack.control_plane_address,
                                          "--listen", f"127.0.0.1:{_free_port()}", *flags),
                             cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
        assert out.returncode == 2
        assert "cannot open the state store" in out.stderr and says in out.stderr
    out = subprocess.run(_gateway_cmd(tokenizer, stack.control_plane_address, "--state-dir",
                                      str(tmp_path), "--database", nowhere),
                         cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 2 and "not allowed with" in out.stderr


def test_stored_responses_expire_by_age(tmp_path):
    store = open_store(tmp_path / "state")
    try:
        responses = StoreResponseStore(store, retention_s=0.5)
        responses.put(StoredResponse("resp_1", {"id": "resp_1"}, [{"role": "user"}], "s", "k"))
        got = responses.get("resp_1")
        assert got is not None and got.messages == [{"role": "user"}]
        assert (got.session_id, got.session_key) == ("s", "k")
        assert responses.get("resp_" + "x" * 5000) is None  # too long to be stored: unknown
        time.sleep(0.6)
        assert responses.get("resp_1") is None
        responses._next_prune = 0.0  # the next put prunes
        responses.put(StoredResponse("resp_2", {}, [], None, None))
        store.flush()
        assert store.get_response("resp_1") is None and store.get_response("resp_2")
    finally:
        store.close()


def test_session_records_change_only_from_the_version_read(tmp_path):
    """The store's compare-and-set that makes one gateway a session's holder."""
    from astraea.store import GatewaySession

    store = open_store(tmp_path / "state")
    try:
        now = time.time()
        free = GatewaySession("s", 1, "", 0.0, now - 100, {"job_id": "j"})
        assert store.put_session(free, None) and not store.put_session(free, None)
        held = GatewaySession("s", 2, "gw-a", now + 30, now, free.state)
        assert store.put_session(held, 1)
        assert not store.put_session(GatewaySession("s", 2, "gw-b", now + 30, now, {}), 1)
        assert store.get_session("s") == held
        assert store.stale_sessions(now - 10, now) == []  # held, lease running
        assert store.stale_sessions(now - 10, now + 60) == [held]  # the holder died
        assert not store.delete_session("s", 1) and store.delete_session("s", 2)
        assert store.get_session("s") is None
    finally:
        store.close()


# --- owners: one API key's responses and sessions are invisible to another --------------------
ALICE, BARE = "sk-alice-0123", "sk-bare-4567"  # alice's named in the key list, the other bare


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def any_state(request, tmp_path) -> list[str]:
    """The gateway flags naming a fresh state, or none (memory)."""
    if request.param == "memory":
        return []
    if request.param == "sqlite":
        return ["--state-dir", str(tmp_path / "state")]
    return ["--database",
            request.getfixturevalue("pg_server").create_database(f"g_{uuid.uuid4().hex[:12]}")]


def _as(client: openai.OpenAI, key: str) -> openai.OpenAI:
    return client.with_options(api_key=key)


def test_another_keys_responses_and_sessions_are_unknown(stack, tokenizer, any_state, jobs):
    with gateway(stack, tokenizer, any_state, "--api-key", f"alice:{ALICE}",
                 "--api-key", BARE) as client:
        alice, other = _as(client, ALICE), _as(client, BARE)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()  # "unused" is no key
        first, h1 = _respond(alice, input="Say hello.", max_output_tokens=6)
        assert alice.responses.retrieve(first.id).id == first.id
        # Another key: exactly what an id nobody stored gets.
        missing = "resp_" + uuid.uuid4().hex
        for rid in (first.id, missing):
            with pytest.raises(openai.NotFoundError) as e:
                other.responses.retrieve(rid)
            err = _error(e.value)
            assert (err["code"], err["param"]) == ("response_not_found", "response_id")
            assert err["message"] == f"No response found with id {rid!r}."
            with pytest.raises(openai.NotFoundError) as e:
                other.responses.create(model=MODEL, input="Go on.", previous_response_id=rid)
            err = _error(e.value)
            assert err["code"] == "previous_response_not_found"
            assert err["message"] == f"Previous response with id {rid!r} not found."

        # The same session name under another key is another session: a job of its own,
        # nothing cached; the first key's session goes on in its job undisturbed.
        sid = f"agent-{uuid.uuid4().hex[:8]}"
        chat1, c1 = _chat(alice, HELLO, sid)
        history = _then(HELLO, chat1, "And goodbye.")
        theirs, c2 = _chat(other, history, sid)
        assert c2["x-session-id"] == sid
        assert c2["x-astraea-job-id"] != c1["x-astraea-job-id"]
        assert theirs.usage.prompt_tokens_details.cached_tokens == 0
        mine, c3 = _chat(alice, history, sid)
        assert c3["x-astraea-job-id"] == c1["x-astraea-job-id"]
        assert mine.usage.prompt_tokens_details.cached_tokens == chat1.usage.total_tokens
        assert jobs(c1["x-astraea-job-id"]).segment_index == 2
        # Nor does a conversation sent without a name find another key's session by its
        # messages.
        unnamed, u1 = _chat(alice, HELLO)
        forked, u2 = _chat(other, _then(HELLO, unnamed, "More."))
        assert u2["x-astraea-job-id"] != u1["x-astraea-job-id"]
        assert forked.usage.prompt_tokens_details.cached_tokens == 0


def test_a_key_file_names_owners_like_the_control_planes(stack, tokenizer, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# the gateway's clients\nalice:{ALICE}\n{BARE}\n")
    with gateway(stack, tokenizer, [], "--api-key-file", str(keys)) as client:
        first, _ = _respond(_as(client, ALICE), input="Hi.", max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            _as(client, BARE).responses.retrieve(first.id)
        with pytest.raises(openai.AuthenticationError):
            _as(client, f"alice:{ALICE}").models.list()  # the name is no part of the key
    keys.write_text(f"alice:{ALICE}\nbob:{ALICE}\n")
    out = subprocess.run(_gateway_cmd(tokenizer, stack.control_plane_address,
                                      "--api-key-file", str(keys)),
                         cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 2 and "the same key twice" in out.stderr


# --- a streamed turn whose client left --------------------------------------------------------
def _events_until(stream, last: str) -> list:
    """The stream's events up to and including the first of type `last`; the rest unread."""
    seen = []
    for ev in stream:
        seen.append(ev)
        if ev.type == last:
            return seen
    raise AssertionError(f"the stream ended before {last}")


def test_a_stream_closed_before_its_end_leaves_the_session_free(stack, tokenizer, any_state,
                                                                 jobs):
    with gateway(stack, tokenizer, any_state) as client:
        sid = f"agent-{uuid.uuid4().hex[:8]}"
        first, h1 = _chat(client, HELLO, sid)
        history = _then(HELLO, first, "Tell me more.")
        # All of the reply read, then closed before the finish chunk and [DONE].
        stream = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8,
                                                stream=True, extra_headers={"X-Session-ID": sid})
        text = ""
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason is not None:
                break
        stream.close()
        # The session is not left busy (409) nor its job abandoned: the next turn goes on
        # in the same job. The turn is wrapped up in the gateway's own time: allow for it.
        after = [*history, {"role": "assistant", "content": text},
                 {"role": "user", "content": "Go on."}]
        _, h2 = _eventually(lambda: _chat(client, after, sid))
        assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
        assert jobs(h1["x-astraea-job-id"]).segment_index == 3

        # The Responses API: read through the text, closed before response.completed. The
        # response is stored as if it had been sent, and continues in its job.
        with client.responses.create(model=MODEL, instructions=RULES, input="Say hello.",
                                     max_output_tokens=6, stream=True) as events:
            seen = _events_until(events, "response.output_text.done")
        rid = seen[0].response.id
        got = _eventually(lambda: client.responses.retrieve(rid))
        assert got.output_text == seen[-1].text
        nxt, _ = _eventually(lambda: _respond(client, input="More.", previous_response_id=rid,
                                               max_output_tokens=4))
        assert nxt.usage.input_tokens_details.cached_tokens == got.usage.total_tokens


def _eventually(call, seconds: float = WAIT_S):
    """`call()`, retried while the gateway says the session is busy or the response unknown
    (the wrap-up of a turn whose client left runs after the stream closed)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except (openai.ConflictError, openai.NotFoundError):
            assert time.monotonic() < deadline, "still busy (or unknown) after the client left"
            time.sleep(0.1)


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
def test_a_client_gone_while_its_send_is_stalled_after_the_segment(stack, tokenizer, tmp_path,
                                                                   durable):
    """The window a slow client opens: the segment has ended, the server is blocked sending
    the events before the wrap-up (the client reads no more), then the client goes. The ASGI
    server cancels the send: the turn is wrapped up all the same. The gateway's app in this
    process, driven as uvicorn drives it (ASGI 2.3: the disconnect cancels the response), then
    the `openai` SDK over it."""
    import asyncio
    import json

    import httpx

    from astraea.client import AsyncAgentClient
    from gateway.app import create_app
    from gateway.chat import ChatTokenizer
    from gateway.config import GatewayConfig

    async def main() -> None:
        state = open_store(tmp_path / "state") if durable else None
        client = AsyncAgentClient(stack.control_plane_address, timeout=30.0,
                                  segment_timeout=None)
        app = create_app(GatewayConfig(model=MODEL, tokenizer=tokenizer), client,
                         ChatTokenizer(tokenizer), reap=False, state=state)
        body = json.dumps({"model": MODEL, "input": "Say hello.", "stream": True,
                           "max_output_tokens": 6}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/responses", "raw_path": b"/v1/responses", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        sent: list[bytes] = []
        stalled, asked = asyncio.Event(), False

        async def receive():
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": body, "more_body": False}
            await stalled.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message.get("body", b""))
            if b"response.output_text.done" in message.get("body", b""):
                stalled.set()
                await asyncio.Event().wait()  # a full socket: never drains

        try:
            await asyncio.wait_for(app(scope, receive, send), WAIT_S)
            events = [json.loads(line[6:]) for chunk in sent
                      for line in chunk.decode().splitlines() if line.startswith("data: ")]
            assert events[-1]["type"] == "response.output_text.done"  # never completed
            rid = events[0]["response"]["id"]
            async with openai.AsyncOpenAI(
                    base_url="http://gw/v1", api_key="unused", max_retries=0,
                    http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app))) as sdk:
                deadline = time.monotonic() + WAIT_S
                while True:  # the wrap-up runs in the background: it stores the response
                    try:
                        got = await sdk.responses.retrieve(rid)
                        break
                    except openai.NotFoundError:
                        assert time.monotonic() < deadline, "the turn was never wrapped up"
                        await asyncio.sleep(0.05)
                assert got.status != "in_progress" and got.output_text == events[-1]["text"]
                nxt = await sdk.responses.create(model=MODEL, input="More.",
                                                 previous_response_id=rid, max_output_tokens=4)
                # Continued in the job its session kept: free, its turn recorded.
                assert nxt.usage.input_tokens_details.cached_tokens == got.usage.total_tokens
        finally:
            await client.close()
            if state is not None:
                state.close()

    asyncio.run(main())


def test_astraea_up_gives_the_gateway_a_state_next_to_the_control_planes(tmp_path):
    from astraea.tools.cli.main import build_parser
    from astraea.tools.cli.stack import up_config

    up = ["up", "--http", "127.0.0.1:0", "--api-key", "k", "--log-dir", str(tmp_path)]
    cfg = up_config(build_parser().parse_args(up))
    assert (cfg.state_dir, cfg.gateway_state_dir) == ("state", "gateway-state")
    cfg = up_config(build_parser().parse_args([*up, "--no-state"]))
    assert (cfg.state_dir, cfg.gateway_state_dir) == ("", "")
