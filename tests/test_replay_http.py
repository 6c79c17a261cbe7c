"""`astraea replay --http`: a trace driven through the OpenAI gateway of a live stack (separate
processes, simulated workers), one chat session per job."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

from astraea.profile import load_profile
from astraea.tools.replay_http import HttpTarget, PromptText, replay_http
from astraea.tools.stack import Stack, StackConfig
from astraea.workloads import generate_mix
from worker.vllm.tiny_model import resolve_tokenizer

TIME_SCALE = 0.02


@pytest.fixture(scope="module")
def stack():
    cfg = StackConfig(workers=1, time_scale=TIME_SCALE, control_plane_listen="127.0.0.1:0",
                      predictor=False, http_listen="127.0.0.1:0")
    with Stack(cfg) as st:
        yield st


@pytest.fixture(scope="module")
def tokenizer() -> str:
    return resolve_tokenizer(None)


@pytest.mark.parametrize("n", [1, 30, 257])
def test_prompt_text_has_the_traces_token_counts(stack, tokenizer, n):
    """The gateway counts exactly the tokens the trace asks for (its template's framing
    included): a first message of n, and a follow-up adding n more after the reply."""
    text = PromptText(tokenizer)
    with openai.OpenAI(base_url=f"{stack.http_address}/v1", api_key="none",
                       max_retries=0) as c:
        messages = [{"role": "user", "content": text.message(n, first=True)}]
        first = c.chat.completions.create(model="astraea", messages=messages, max_tokens=3)
        assert first.usage.prompt_tokens == max(n, text.first_overhead + 1)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": text.message(n, first=False)}]
        second = c.chat.completions.create(model="astraea", messages=messages, max_tokens=3)
        # The reply's own framing (its end-of-turn) comes on top of the new message.
        added = second.usage.prompt_tokens - first.usage.prompt_tokens - 3
        assert max(n, text.next_overhead + 1) <= added <= max(n, text.next_overhead + 1) + 2


def test_a_trace_replays_through_the_gateway(stack, tokenizer):
    profile = load_profile("gptj-6b-a100")
    jobs = generate_mix(6, 3, qps=4.0, context_window=profile.context_window)
    target = HttpTarget(f"{stack.http_address}/v1", stack.config.served_model)
    result = asyncio.run(replay_http(jobs, target, tokenizer, profile, TIME_SCALE))
    assert result.errors == {}
    assert all(not math.isnan(r.finish_s) for r in result.records)
    # Each JCT covers the job's tools (slept in virtual time) and its segments.
    for r, job in zip(sorted(result.records, key=lambda r: r.job_id),
                      sorted(jobs, key=lambda j: j.job_id)):
        assert r.finish_s - r.arrival_s >= job.api_time_s


def test_a_wrong_model_fails_each_job_with_the_gateways_message(stack, tokenizer):
    profile = load_profile("gptj-6b-a100")
    jobs = generate_mix(2, 0, qps=4.0, context_window=profile.context_window)
    target = HttpTarget(f"{stack.http_address}/v1", "no-such-model")
    result = asyncio.run(replay_http(jobs, target, tokenizer, profile, TIME_SCALE))
    assert set(result.errors) == {j.job_id for j in jobs}
    assert all("NotFoundError" in e and "no-such-model" in e for e in result.errors.values())


def test_the_demos_agent_keeps_one_job_and_its_context(stack):
    """The demo's agent (official SDK, no session key): every turn continues the same job and
    reports the whole previous context as cached - nothing recomputed but the new messages."""
    from astraea.tools.demo_openai import run_agent

    turns = run_agent(f"{stack.http_address}/v1", stack.config.served_model, tool_s=0.05)
    assert len(turns) == 4 and len({t["job"] for t in turns}) == 1
    assert turns[0]["cached_tokens"] == 0
    for before, after in zip(turns, turns[1:]):
        assert after["cached_tokens"] == before["prompt_tokens"] + before["completion_tokens"]
