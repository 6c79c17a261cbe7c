"""The OpenAI gateway over a live stack of simulated workers, driven by the official `openai`
SDK: the stack (control plane, a simulated worker, the gateway) runs as separate processes,
started by `astraea.tools.stack.Stack` as `astraea up --http` does."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from gateway_stack import job_lookup, openai_client, sim_gateway_stack

from astraea.tools.stack import StackConfig, StackError
from astraea.v1 import common_pb2

KEY = "sk-test-key"
MODEL = "astraea"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def stack():
    with sim_gateway_stack(KEY, MODEL) as st:
        yield st


@pytest.fixture(scope="module")
def client(stack):
    with openai_client(stack, KEY) as c:
        yield c


@pytest.fixture(scope="module")
def jobs(stack):
    with job_lookup(stack) as get:
        yield get


def _create(client, **kw):
    """(the parsed completion, the response headers)."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, **kw)
    return raw.parse(), raw.headers


def _error(e: openai.APIStatusError) -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def _wait_finished(jobs, job_id: str) -> common_pb2.JobStatus:
    deadline = time.monotonic() + 10
    while True:
        status = jobs(job_id)
        if status.state == common_pb2.JOB_STATE_FINISHED or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_models_and_health(stack, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{stack.http_address}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    r = httpx.get(f"{stack.http_address}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_a_completion_has_text_usage_and_a_finish_reason(client):
    done, headers = _create(client, messages=HELLO, max_tokens=8)
    assert done.object == "chat.completion" and done.model == MODEL
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    # A simulated worker generates exactly max_tokens placeholder tokens.
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 8
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + 8
    assert headers["x-session-id"] and headers["x-astraea-job-id"]


def test_a_follow_up_continues_the_same_job_from_its_kept_context(client, jobs):
    first, h1 = _create(client, messages=HELLO, max_tokens=6)
    history = [*HELLO, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "user", "content": "And goodbye."}]
    second, h2 = _create(client, messages=history, max_tokens=6)
    # No session id was sent: the messages themselves found the session.
    assert h2["x-session-id"] == h1["x-session-id"]
    assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
    assert jobs(h1["x-astraea-job-id"]).segment_index == 2
    kept = first.usage.total_tokens
    assert second.usage.prompt_tokens > kept
    # An idle worker preserves the context over the wait: only the new turn is prefilled.
    assert second.usage.prompt_tokens_details.cached_tokens == kept


def test_a_named_session_whose_history_changed_starts_a_new_job(client, jobs):
    sid = {"X-Session-ID": "named-1"}
    first, h1 = _create(client, messages=HELLO, max_tokens=4, extra_headers=sid)
    assert h1["x-session-id"] == "named-1"
    edited = [*HELLO, {"role": "assistant", "content": "something I never said"},
              {"role": "user", "content": "Again."}]
    second, h2 = _create(client, messages=edited, max_tokens=4, extra_headers=sid)
    assert h2["x-session-id"] == "named-1"
    assert h2["x-astraea-job-id"] != h1["x-astraea-job-id"]
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert _wait_finished(jobs, h1["x-astraea-job-id"]).state == common_pb2.JOB_STATE_FINISHED


def test_session_ids_are_read_from_the_body_and_agent_headers(client):
    _, h = _create(client, messages=HELLO, max_tokens=2, extra_body={"session_id": "body-1"})
    assert h["x-session-id"] == "body-1"
    _, h = _create(client, messages=HELLO, max_tokens=2,
                   extra_body={"nvext": {"agent_context": {"trajectory_id": "traj-1"}}})
    assert h["x-session-id"] == "traj-1"
    for header in ("x-claude-code-session-id", "session-id", "x-dynamo-trajectory-id"):
        _, h = _create(client, messages=HELLO, max_tokens=2,
                       extra_headers={header: f"via-{header}"})
        assert h["x-session-id"] == f"via-{header}"


def test_close_ends_the_sessions_job(client, jobs):
    _, h = _create(client, messages=HELLO, max_tokens=2,
                   extra_body={"nvext": {"session_control": {"action": "close"}}})
    assert _wait_finished(jobs, h["x-astraea-job-id"]).state == common_pb2.JOB_STATE_FINISHED


def test_streaming_sends_chunks_a_finish_reason_and_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=7,
                                            stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_the_stream_ends_with_done(stack):
    with httpx.stream("POST", f"{stack.http_address}/v1/chat/completions",
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 3,
                            "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_a_client_that_leaves_mid_stream_cancels_only_its_own_segment(stack, client, jobs):
    other, ho = _create(client, messages=[{"role": "user", "content": "I stay."}], max_tokens=3)
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "I leave."}], max_tokens=1500,
            stream=True) as resp:
        job_id = resp.headers["x-astraea-job-id"]
        for _ in zip(range(3), resp.iter_lines()):
            pass
    # Closed after a few chunks, long before 1,500 tokens: the job was cancelled, which
    # aborts it on the worker (the vLLM module checks the worker's blocks come back).
    status = _wait_finished(jobs, job_id)
    assert status.state == common_pb2.JOB_STATE_FINISHED
    assert status.generated_tokens < 1500
    # The other session goes on, in its own job.
    follow = [{"role": "user", "content": "I stay."},
              other.choices[0].message.model_dump(exclude_none=True),
              {"role": "user", "content": "Still here."}]
    _, h = _create(client, messages=follow, max_tokens=3)
    assert h["x-astraea-job-id"] == ho["x-astraea-job-id"]


def test_a_busy_session_refuses_a_second_request(client):
    sid = {"X-Session-ID": "busy-1"}
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=HELLO, max_tokens=1500, stream=True, extra_headers=sid) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        with pytest.raises(openai.ConflictError) as e:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                           extra_headers=sid)
        assert "busy-1" in _error(e.value)["message"]
        assert sum(1 for _ in lines) > 0  # the first request goes on to its end


def test_an_unnamed_fork_of_a_busy_conversation_gets_a_session_of_its_own(client):
    ask = [{"role": "user", "content": "Fork me."}]
    first, h1 = _create(client, messages=ask, max_tokens=3)
    follow = [*ask, first.choices[0].message.model_dump(exclude_none=True),
              {"role": "user", "content": "Go on."}]
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=follow, max_tokens=1500, stream=True) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        assert r.headers["x-astraea-job-id"] == h1["x-astraea-job-id"]
        _, h2 = _create(client, messages=follow, max_tokens=2)
        assert h2["x-astraea-job-id"] != h1["x-astraea-job-id"]
        assert h2["x-session-id"] != h1["x-session-id"]


@pytest.mark.parametrize("kw,param", [
    ({"n": 2}, "n"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"extra_body": {"astraea": {"next_tool_category": ""}}}, "astraea.next_tool_category"),
    ({"extra_body": {"astraea": {"next_tool_category": "x" * 129}}},
     "astraea.next_tool_category"),
    ({"extra_body": {"astraea": {"guess": 1}}}, "astraea.guess"),
    ({"extra_body": {"astraea": {"expected_tool_s": -1}}}, "astraea.expected_tool_s"),
    ({"extra_body": {"nvext": {"agent_hints": {"osl": 0}}}}, "nvext.agent_hints.osl"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
])
def test_bad_fields_get_a_400_naming_them(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, **kw)
    assert _error(e.value)["param"] == param


def test_a_tool_category_hint_is_accepted_and_the_session_goes_on(client):
    """`astraea.next_tool_category` names the API wait after the reply (the scheduler and the
    predictor learn under it); the next request continues the same job."""
    hint = {"astraea": {"next_tool_category": "web-search"}}
    first, h1 = _create(client, messages=HELLO, max_tokens=4, extra_body=hint)
    follow = [*HELLO, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And again."}]
    second, h2 = _create(client, messages=follow, max_tokens=4)
    assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
    assert second.usage.prompt_tokens_details.cached_tokens == \
        first.usage.prompt_tokens + first.usage.completion_tokens


def test_the_job_category_hint_names_the_sessions_job(client, jobs):
    done, headers = _create(client, messages=HELLO, max_tokens=2,
                            extra_body={"astraea": {"job_category": "coder"}})
    assert jobs(headers["x-astraea-job-id"]).category == "coder"
    _, plain = _create(client, messages=[{"role": "user", "content": "Other."}], max_tokens=2)
    assert jobs(plain["x-astraea-job-id"]).category == "chat"


def test_output_and_tool_time_hints_are_accepted_and_checked(client):
    """nvext.agent_hints.osl and astraea.expected_tool_s reach the control plane, which
    checks them too: an output longer than the model's window is a 400 with its message."""
    hints = {"nvext": {"agent_hints": {"osl": 4}},
             "astraea": {"next_tool_category": "search", "expected_tool_s": 2.5}}
    done, _ = _create(client, messages=HELLO, max_tokens=4, extra_body=hints)
    assert done.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4,
                                       extra_body={"nvext": {"agent_hints": {"osl": 10 ** 7}}})
    assert "expected_output_tokens" in _error(e.value)["message"]


def test_wrong_types_and_a_tool_message_that_answers_nothing(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages="hello")
    assert _error(e.value)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[
            *HELLO, {"role": "tool", "tool_call_id": "call_nope", "content": "42"}])
    err = _error(e.value)
    assert err["param"] == "messages[1].tool_call_id" and "call_nope" in err["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    err = _error(e.value)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]


def test_malformed_json_and_an_oversized_body(stack):
    url, auth = f"{stack.http_address}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, headers={**auth, "Content-Type": "application/json"},
                   content=b'{"model": "astraea", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": "x" * (5 * 1024 * 1024)}]})
    r = httpx.post(url, headers={**auth, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_api_keys(stack, client):
    for key in ("sk-wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{stack.http_address}/v1/chat/completions", headers=headers,
                       json={"model": MODEL, "messages": HELLO})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{stack.http_address}/v1", api_key="sk-wrong",
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    # Bad requests changed nothing: the gateway still answers.
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_a_public_address_needs_an_api_key():
    with pytest.raises(StackError, match="api_keys"):
        StackConfig(http_listen="0.0.0.0:8000")
