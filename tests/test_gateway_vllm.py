"""The OpenAI gateway in front of a real vLLM worker on the project's tiny model, driven by
the official `openai` SDK: a session's second turn resumes the KV its first turn left, and
greedy text is the same streamed or not."""

from __future__ import annotations

import json
import time

import grpc
import openai
import pytest

from astraea.tools.stack import Stack, StackConfig
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2

pytest.importorskip("vllm")

MODEL = "tiny"
QUESTION = [{"role": "system", "content": "You answer in short sentences."},
            {"role": "user", "content": "How is memory for the cache cut into blocks?"}]


@pytest.fixture(scope="module")
def stack():
    cfg = StackConfig(backend="vllm", workers=1, time_scale=1.0, predictor=False,
                      control_plane_listen="127.0.0.1:0", http_listen="127.0.0.1:0",
                      served_model=MODEL)
    with Stack(cfg) as st:
        yield st


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=f"{stack.http_address}/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def _create(client, **kw):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, temperature=0, **kw)
    return raw.parse(), raw.headers


def test_the_second_turn_reuses_the_first_turns_context(client):
    first, h1 = _create(client, messages=QUESTION, max_tokens=12)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "user", "content": "Why?"}]
    second, h2 = _create(client, messages=history, max_tokens=12)
    assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
    # The job's KV stayed on the worker over the wait (an idle pool preserves it): only the
    # new turn is prefilled, plus the first turn's last token, sampled but never fed back.
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens - 1
    assert second.usage.prompt_tokens > first.usage.total_tokens


def test_greedy_text_is_the_same_streamed_and_not(client):
    whole, _ = _create(client, messages=QUESTION, max_tokens=16)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_leaving_mid_stream_cancels_the_job_and_other_sessions_go_on(stack, client):
    kept, hk = _create(client, messages=QUESTION, max_tokens=4)
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me everything."}],
            max_tokens=1000, temperature=0, stream=True) as resp:
        job_id = resp.headers["x-astraea-job-id"]
        for _ in zip(range(3), resp.iter_lines()):
            pass
    with grpc.insecure_channel(stack.control_plane_address) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        deadline = time.monotonic() + 30
        while stub.GetJob(agent_pb2.GetJobRequest(job_id=job_id)).state != \
                common_pb2.JOB_STATE_FINISHED:
            assert time.monotonic() < deadline, "the abandoned job was not cancelled"
            time.sleep(0.1)
        assert stub.GetJob(agent_pb2.GetJobRequest(job_id=job_id)).generated_tokens < 1000
    follow = [*QUESTION, kept.choices[0].message.model_dump(exclude_none=True),
              {"role": "user", "content": "Go on."}]
    again, h = _create(client, messages=follow, max_tokens=4)
    assert h["x-astraea-job-id"] == hk["x-astraea-job-id"]
    assert again.usage.prompt_tokens_details.cached_tokens == kept.usage.total_tokens - 1


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Tokyo", "Paris"]}},
                   "required": ["city"], "additionalProperties": False}}}


def test_a_forced_tool_call_is_decoded_to_its_schema_and_the_answer_continues_it(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first, h1 = _create(client, messages=ask, max_tokens=100, tools=[WEATHER],
                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Tokyo", "Paris")
    # The tool's answer continues the same job, from the context the call left.
    answer = [*ask, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    second, h2 = _create(client, messages=answer, max_tokens=8, tools=[WEATHER])
    assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens - 1


def test_a_turn_the_model_stops_keeps_its_job_open_but_a_cut_text_is_not_reused(stack, client):
    ask = [{"role": "user", "content": "Where do the blocks of the cache go?"}]
    free, _ = _create(client, messages=ask, max_tokens=16)
    text = free.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    # The same greedy turn with a stop string from its middle: the model stops by itself.
    first, h1 = _create(client, messages=ask, max_tokens=16, stop=[stop])
    assert first.choices[0].finish_reason == "stop"
    assert stop not in first.choices[0].message.content
    with grpc.insecure_channel(stack.control_plane_address) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)

        def state(job_id):
            return stub.GetJob(agent_pb2.GetJobRequest(job_id=job_id)).state

        # The job waits open over the stop, for the session's next request ...
        assert state(h1["x-astraea-job-id"]) == common_pb2.JOB_STATE_API_WAIT
        follow = [*ask, first.choices[0].message.model_dump(exclude_none=True),
                  {"role": "user", "content": "And then?"}]
        second, h2 = _create(client, messages=follow, max_tokens=4)
        # ... but its context holds the stop string's tokens, which the returned text (and so
        # the next prompt) does not: that request starts a new job with the whole prompt.
        assert h2["x-session-id"] == h1["x-session-id"]
        assert h2["x-astraea-job-id"] != h1["x-astraea-job-id"]
        assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
        assert state(h1["x-astraea-job-id"]) == common_pb2.JOB_STATE_FINISHED


# The Responses API and text completions, on the same stack.

WEATHER_TOOL = {"type": "function", **WEATHER["function"]}
RULES = "You answer in short sentences."


def _respond(client, **kw):
    raw = client.responses.with_raw_response.create(model=MODEL, temperature=0,
                                                    instructions=RULES, tools=[WEATHER_TOOL],
                                                    **kw)
    return raw.parse(), raw.headers


def _call(response):
    calls = [o for o in response.output if o.type == "function_call"]
    assert len(calls) == 1, response.output
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Tokyo", "Paris")
    return calls[0]


def test_a_tool_calling_agent_over_the_responses_api_resumes_its_job(client):
    # Turn 1: the model must call the tool (decoded under the call's schema).
    first, h1 = _respond(client, input="What is the weather in Paris?", tool_choice="required",
                         max_output_tokens=100)
    assert first.status == "completed", first.output
    call = _call(first)
    assert first.usage.input_tokens_details.cached_tokens == 0
    # Turn 2: only the tool's output is sent; the stored response holds the rest.
    second, h2 = _respond(client, previous_response_id=first.id, max_output_tokens=8,
                          input=[{"type": "function_call_output", "call_id": call.call_id,
                                  "output": "Sunny, 21 C"}])
    assert h2["x-astraea-job-id"] == h1["x-astraea-job-id"]
    # The job's KV stayed over the tool call: all of turn 1 is cached but its last token,
    # sampled and never fed back.
    assert second.usage.input_tokens_details.cached_tokens == first.usage.total_tokens - 1
    assert second.usage.input_tokens > first.usage.total_tokens
    assert [o.type for o in second.output] == ["message"]
    assert second.status in ("completed", "incomplete")
    assert client.responses.retrieve(second.id).output_text == second.output_text
    # Turn 3, streamed with the SDK's helper: another forced call, from where turn 2 ended.
    with client.responses.stream(model=MODEL, temperature=0, instructions=RULES,
                                 tools=[WEATHER_TOOL], tool_choice="required",
                                 previous_response_id=second.id, max_output_tokens=100,
                                 input="And in Tokyo?") as stream:
        kinds = [e.type for e in stream]
        third = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    _call(third)
    assert third.usage.input_tokens_details.cached_tokens == second.usage.total_tokens - 1
    # A function_call_output that answers no call of the conversation is refused.
    with pytest.raises(openai.BadRequestError) as e:
        _respond(client, previous_response_id=third.id, input=[
            {"type": "function_call_output", "call_id": call.call_id + "x", "output": "?"}])
    assert e.value.body["param"] == "input[0].call_id"


def test_greedy_text_completion_is_the_same_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="The cache is cut into",
                                      max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="The cache is cut into",
                                            max_tokens=12, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text and text == whole.choices[0].text
    assert whole.usage.completion_tokens <= 12
