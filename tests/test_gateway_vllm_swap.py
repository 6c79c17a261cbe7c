"""A tool wait whose KV is swapped to host memory, through the OpenAI gateway on a real vLLM
worker: the resumed turn reports the previous context as `cached_tokens`, and the worker's
own count of the tokens it prefilled (its admission span) agrees.

InferCept's policy swaps a paused job's KV at every tool call whose copy its swap budget
hides (a short context on an idle engine nearly always is: the budget comes from measured
step times), so the swapped path is the one taken; tests/test_gateway_vllm.py covers the
preserved one."""

from __future__ import annotations

import json

import openai
import pytest

from astraea.telemetry import spans
from astraea.telemetry.span_files import load_spans
from astraea.tools.stack import Stack, StackConfig

pytest.importorskip("vllm")

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}},
                   "required": ["city"], "additionalProperties": False}}}


def test_a_swapped_tool_wait_is_not_recomputed_and_the_worker_agrees(tmp_path):
    """(Or, when InferCept discards instead, all of it is recomputed and reported so.)"""
    span_dir = tmp_path / "spans"
    span_dir.mkdir()
    cfg = StackConfig(backend="vllm", workers=1, time_scale=1.0, predictor=False,
                      policy="infercept", control_plane_listen="127.0.0.1:0",
                      http_listen="127.0.0.1:0", served_model=MODEL,
                      log_dir=str(tmp_path / "logs"), span_dir=str(span_dir))
    with Stack(cfg) as st, openai.OpenAI(base_url=f"{st.http_address}/v1", api_key="unused",
                                         max_retries=0, timeout=120) as client:
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, messages=ask, tools=[WEATHER], tool_choice="required",
            max_tokens=100)
        first, job_id = raw.parse(), raw.headers["x-astraea-job-id"]
        call = first.choices[0].message.tool_calls[0]
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Tokyo")
        answer = [*ask, first.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, messages=answer, tools=[WEATHER], max_tokens=8)
        second = raw.parse()
        assert raw.headers["x-astraea-job-id"] == job_id
    records = load_spans(str(span_dir))  # complete: the stack has stopped
    waits = sorted((s for s in records if s.name == "api_wait"
                    and s.attributes.get(spans.JOB_ID) == job_id), key=lambda s: s.start)
    action = waits[0].attributes.get(spans.KV_ACTION)  # the tool call's wait (turn 2's follows)
    admissions = sorted((s for s in records if s.name == "admission"
                         and s.attributes.get(spans.JOB_ID) == job_id), key=lambda s: s.start)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # InferCept swaps when its per-step swap budget hides the copy, which it measures from the
    # live engine's step times: almost always here, but a slow step can tip it to a discard.
    assert action in ("swap", "discard"), action
    if action == "swap":
        # All of turn 1 came back from host memory but its last token (sampled, never fed back).
        assert cached == first.usage.total_tokens - 1
        assert [s.attributes.get("astraea.swap_in") for s in admissions] == [False, True]
    else:
        assert cached == 0
    # Either way the worker prefilled exactly what the client was told was not cached.
    assert admissions[-1].attributes["astraea.prefill_tokens"] == \
        second.usage.prompt_tokens - cached
