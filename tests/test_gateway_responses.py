"""The Responses API (`/v1/responses`) and legacy text completions (`/v1/completions`) of the
OpenAI gateway over a live stack of simulated workers, driven by the official `openai` SDK
(the stack runs as separate processes, as `astraea up --http` starts it). A simulated worker
generates exactly the token budget of placeholder tokens, so every answer here runs to its
limit (`incomplete`, `length`); function calls decoded to a schema are covered by the vLLM
module."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from gateway_stack import job_lookup, openai_client, sim_gateway_stack

from astraea.v1 import common_pb2
from gateway import response_schemas
from gateway.response_store import MemoryResponseStore, StoredResponse

KEY = "sk-test-key"
MODEL = "astraea"
RULES = "You are terse."
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


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


def _respond(client, **kw):
    """(the parsed response, the response headers)."""
    raw = client.responses.with_raw_response.create(model=MODEL, **kw)
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


def test_a_response_has_a_message_usage_and_can_be_retrieved(client):
    r, headers = _respond(client, input="Say hello.", instructions=RULES, max_output_tokens=8)
    assert r.object == "response" and r.model == MODEL and r.id.startswith("resp_")
    # The budget ran out: OpenAI calls that incomplete, and says why.
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"]
    assert r.output[0].role == "assistant" and r.output[0].content[0].type == "output_text"
    assert r.output_text and r.instructions == RULES and r.store
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + 8
    assert r.usage.input_tokens_details.cached_tokens == 0
    assert headers["x-session-id"] and headers["x-astraea-job-id"]
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    assert again.usage.total_tokens == r.usage.total_tokens


def test_previous_response_id_continues_the_same_job(client, jobs):
    first, h1 = _respond(client, input="Say hello.", instructions=RULES, max_output_tokens=6)
    second, h2 = _respond(client, input="And goodbye.", instructions=RULES,
                          previous_response_id=first.id, max_output_tokens=6)
    assert second.previous_response_id == first.id
    assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
    assert jobs(h1["x-astraea-job-id"]).segment_index == 2
    # Only the new input was prefilled: the whole first turn is reported cached.
    kept = first.usage.total_tokens
    assert second.usage.input_tokens_details.cached_tokens == kept
    assert second.usage.input_tokens > kept
    # A fork from the first response runs on a job of its own; the chain goes on in its own.
    fork, hf = _respond(client, input="Something else.", instructions=RULES,
                        previous_response_id=first.id, max_output_tokens=4)
    assert hf["x-astraea-job-id"] != h1["x-astraea-job-id"]
    assert fork.usage.input_tokens_details.cached_tokens == 0
    third, h3 = _respond(client, input="Once more.", instructions=RULES,
                         previous_response_id=second.id, max_output_tokens=4)
    assert h3["x-astraea-job-id"] == h1["x-astraea-job-id"]
    assert third.usage.input_tokens_details.cached_tokens == second.usage.total_tokens


def test_function_calls_and_their_outputs_are_accepted_as_input_items(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}]
    r, _ = _respond(client, input=items, tools=[TOOL], tool_choice="auto",
                    max_output_tokens=4)
    assert r.output and r.tools[0].name == "get_weather"
    assert r.usage.output_tokens == 4


def test_a_response_not_stored_cannot_be_retrieved_nor_continued(client):
    r, _ = _respond(client, input="Say hello.", store=False, max_output_tokens=2)
    assert r.store is False
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert r.id in _error(e.value)["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="More.", previous_response_id=r.id)
    err = _error(e.value)
    assert err["param"] == "previous_response_id" and r.id in err["message"]


def test_unknown_ids_are_404s(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve("resp_nope")
    assert "resp_nope" in _error(e.value)["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="Hi.", previous_response_id="resp_nope")
    err = _error(e.value)
    assert err["param"] == "previous_response_id" and "resp_nope" in err["message"]


def test_a_streamed_response_sends_the_events_the_sdk_expects(client):
    events = list(client.responses.create(model=MODEL, input="Say hello.",
                                          max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert {k for k in kinds[4:-4]} == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and final.output_text == text == events[-4].text
    assert final.usage.output_tokens == 6
    assert client.responses.retrieve(final.id).output_text == text


def test_a_streamed_response_continues_a_stored_one(client):
    first, _ = _respond(client, input="Say hello.", max_output_tokens=4)
    with client.responses.stream(model=MODEL, input="Again.", max_output_tokens=4,
                                 previous_response_id=first.id) as stream:
        events = list(stream)
    final = events[-1].response
    assert final.previous_response_id == first.id
    assert final.usage.input_tokens_details.cached_tokens == first.usage.total_tokens


@pytest.mark.parametrize("kw,param", [
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
     "input[0].arguments"),
    ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input[0]"),
    ({"truncation": "auto"}, "truncation"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"tools": [TOOL], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
     "tool_choice"),
    ({"max_output_tokens": "5"}, "max_output_tokens"),
])
def test_bad_fields_get_a_400_naming_them(client, kw, param):
    kw.setdefault("input", "Hi.")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, **kw)
    assert _error(e.value)["param"] == param


def test_a_client_that_resends_the_conversation_continues_the_job_too(client):
    ask = [{"role": "user", "content": "Say hello."}]
    first, h1 = _respond(client, input=ask, instructions=RULES, store=False,
                         max_output_tokens=5)
    # The output items as the SDK gives them back (with every field it knows of).
    echoed = [o.model_dump() for o in first.output]
    second, h2 = _respond(client, input=[*ask, *echoed, {"role": "user", "content": "More."}],
                          instructions=RULES, store=False, max_output_tokens=5)
    assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
    assert second.usage.input_tokens_details.cached_tokens == first.usage.total_tokens


def test_a_client_that_leaves_mid_stream_cancels_the_segment(client, jobs):
    first, h1 = _respond(client, input="Say hello.", max_output_tokens=3)
    with client.responses.with_streaming_response.create(
            model=MODEL, input="Tell me everything.", previous_response_id=first.id,
            max_output_tokens=1500, stream=True) as resp:
        assert resp.headers["x-astraea-job-id"] == h1["x-astraea-job-id"]
        for line in resp.iter_lines():  # leave once the segment is generating
            if "response.output_text.delta" in line:
                break
    status = _wait_finished(jobs, h1["x-astraea-job-id"])
    assert status.state == common_pb2.JOB_STATE_FINISHED and status.generated_tokens < 1500
    # The stored response still answers; continuing it now starts a new job, whole prompt.
    again, h2 = _respond(client, input="Briefly.", previous_response_id=first.id,
                         max_output_tokens=3)
    assert h2["x-astraea-job-id"] != h1["x-astraea-job-id"]
    assert again.usage.input_tokens_details.cached_tokens == 0


def test_input_items_become_chat_messages():
    req = response_schemas.parse({"model": MODEL, "input": [
        {"role": "user", "content": "Weather?"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c2", "output": "two"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "one"}]}]})
    messages = response_schemas.input_messages(req, [])
    # Text and the calls that follow it are one assistant message, as chat writes it.
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "Looking."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "one"}


def test_a_function_call_output_must_answer_a_call(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[
            {"role": "user", "content": "Hi."},
            {"type": "function_call_output", "call_id": "call_nope", "output": "42"}])
    err = _error(e.value)
    assert err["param"] == "input[1].call_id" and "call_nope" in err["message"]


def test_an_unknown_model_is_a_404(client):
    for create in (lambda: client.responses.create(model="gpt-9", input="Hi."),
                   lambda: client.completions.create(model="gpt-9", prompt="Hi.")):
        with pytest.raises(openai.NotFoundError) as e:
            create()
        err = _error(e.value)
        assert err["code"] == "model_not_found" and "gpt-9" in err["message"]


def test_the_response_store_keeps_the_newest():
    store = MemoryResponseStore(capacity=2)
    for i in range(3):
        store.put(StoredResponse(f"r{i}", {"id": f"r{i}"}, [], None, None))
    assert store.get("r0") is None and store.get("r2").body == {"id": "r2"}
    assert len(store) == 2


def test_a_text_completion_is_a_one_segment_job(client, jobs):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time",
                                                      max_tokens=5)
    done = raw.parse()
    assert done.object == "text_completion" and done.model == MODEL
    choice = done.choices[0]
    assert choice.text and choice.finish_reason == "length" and choice.index == 0
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens > 0
    assert "x-session-id" not in raw.headers
    status = _wait_finished(jobs, raw.headers["x-astraea-job-id"])
    assert status.state == common_pb2.JOB_STATE_FINISHED and status.segment_index == 1


def test_a_streamed_text_completion(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["Once upon a time"],
                                            max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text and finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_text_completions_in_a_named_session_continue_its_job(client):
    sid = {"X-Session-ID": "text-1"}
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time",
                                                      max_tokens=5, extra_headers=sid)
    first = raw.parse()
    assert raw.headers["x-session-id"] == "text-1"
    more = "Once upon a time" + first.choices[0].text + " the end."
    raw2 = client.completions.with_raw_response.create(model=MODEL, prompt=more,
                                                       max_tokens=5, extra_headers=sid)
    second = raw2.parse()
    assert raw2.headers["x-astraea-job-id"] == raw.headers["x-astraea-job-id"]
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
    # A prompt that does not continue it starts the session over, in a new job.
    raw3 = client.completions.with_raw_response.create(model=MODEL, prompt="Another story",
                                                       max_tokens=2, extra_headers=sid)
    assert raw3.headers["x-astraea-job-id"] != raw.headers["x-astraea-job-id"]
    assert raw3.parse().usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("kw,param", [
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"echo": True}, "echo"),
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
])
def test_bad_completion_fields_get_a_400_naming_them(client, kw, param):
    kw.setdefault("prompt", "Hi.")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, **kw)
    err = _error(e.value)
    assert err["param"] == param


def test_the_new_endpoints_need_the_api_key(stack):
    for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/resp_x"),
                         ("POST", "/v1/completions")):
        r = httpx.request(method, f"{stack.http_address}{path}", json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
