"""A segment's sampling on the vLLM worker: temperature, top_p, seed, stop strings and a JSON
schema (structured outputs), each through the real stack (an in-process control plane over
gRPC on loopback, one worker task with `VllmBackend` on the tiny model, `AsyncAgentClient`);
the stop-string text matcher on its own; the tiny model's chat template.

One stack serves the module (the engine takes seconds to start).
"""

from __future__ import annotations

import contextlib
import json

import pytest

from worker.vllm.detokenize import StopText

# --- the stop-string matcher (no engine) ------------------------------------------------------


def feed(stop: list[str], chunks: list[str]) -> tuple[str, bool]:
    s = StopText(stop)
    out = "".join(s.push(c, final=i == len(chunks) - 1) for i, c in enumerate(chunks))
    return out, s.stopped


@pytest.mark.parametrize(("stop", "chunks", "text", "stopped"), [
    (["</tool_call>"], ["a </to", "ol_ca", "ll> b"], "a ", True),  # split over three chunks
    (["END"], ["xEN", "D"], "x", True),
    (["abc"], ["xa", "b", "d"], "xabd", False),  # a false start is released, not lost
    (["ab", "b"], ["xab"], "x", True),  # the earliest match wins
    ([], ["plain ", "text"], "plain text", False),
    (["zz"], ["az", "z tail", " more"], "a", True),  # nothing after the match
])
def test_stop_text(stop, chunks, text, stopped) -> None:
    assert feed(stop, chunks) == (text, stopped)


def test_stop_text_holds_back_only_a_possible_start() -> None:
    s = StopText(["STOP"])
    assert s.push("one ST") == "one "  # "ST" may begin STOP
    assert s.push("ART two") == "START two"  # it did not
    assert not s.stopped


# --- the live stack ----------------------------------------------------------------------------

pytest.importorskip("vllm")

from live_vllm import Live, live_stack  # noqa: E402

from astraea.client.client import AstraeaError, AsyncAgentClient, FinishReason  # noqa: E402
from astraea.v1 import common_pb2  # noqa: E402
from worker.vllm.backend import VllmBackend  # noqa: E402
from worker.vllm.engine import EngineConfig  # noqa: E402
from worker.vllm.tiny_model import build_tiny_model  # noqa: E402

PROMPT = "Question: what is the weather in Tokyo today? Thought: I should ask the weather tool."
TOOL_CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {"city": {"enum": ["Tokyo", "Paris"]}},
                      "required": ["city"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def live(model_dir):
    backend = VllmBackend(EngineConfig(model=str(model_dir), num_blocks=49))
    with live_stack(backend, "gptj-6b-a100", register_timeout_s=120,
                    run_timeout_s=120) as stack:
        yield stack


async def one_segment(live: Live, job_id: str, **kwargs):
    """A one-segment job; returns the segment's result."""
    async with AsyncAgentClient(live.address) as client:
        await client.start_job(job_id)
        result = await client.run_segment(job_id, **kwargs)
        await client.end_job(job_id)
        return result


def test_temperature_seed_and_top_p_are_honoured(live) -> None:
    async def main():
        run = {"prompt_text": PROMPT, "max_tokens": 32}
        greedy = [await one_segment(live, f"g{i}", temperature=0.0, **run) for i in range(2)]
        seeded = [await one_segment(live, f"s{i}", temperature=1.5, seed=7, **run)
                  for i in range(2)]
        other = await one_segment(live, "s-other", temperature=1.5, seed=8, **run)
        narrow = await one_segment(live, "p", temperature=1.5, top_p=1e-6, seed=9, **run)
        return greedy, seeded, other, narrow

    greedy, seeded, other, narrow = live.run(main())
    assert greedy[0].tokens == greedy[1].tokens
    # A seed makes a sampled segment reproducible ...
    assert seeded[0].tokens == seeded[1].tokens
    # ... and sampling at 1.5 is not greedy decoding: two seeds, and greedy, all differ.
    assert seeded[0].tokens != greedy[0].tokens
    assert other.tokens != seeded[0].tokens
    # top_p that keeps only the most likely token is greedy again, whatever the temperature.
    assert narrow.tokens == greedy[0].tokens


def test_stop_string_ends_the_segment_before_it(live) -> None:
    async def main():
        free = await one_segment(live, "free", prompt_text=PROMPT, max_tokens=40,
                                 temperature=0.0)
        # A stop string taken from the middle of the greedy text, across a token boundary.
        mid = len(free.text) // 2
        stop = free.text[mid:mid + 3]
        cut = await one_segment(live, "cut", prompt_text=PROMPT, max_tokens=40,
                                temperature=0.0, stop=[stop, "never appears here"])
        return free, stop, cut

    free, stop, cut = live.run(main())
    assert len(stop) == 3 and stop in free.text
    assert cut.finish_reason is FinishReason.STOP
    # The text is the greedy text up to the first match, the stop string not included.
    assert cut.text == free.text[:free.text.index(stop)]
    # The tokens are the greedy ones up to the token that completed the match.
    assert cut.tokens == free.tokens[:len(cut.tokens)]
    assert len(cut.tokens) < len(free.tokens)


def test_stopped_job_continues_from_its_preserved_kv(live) -> None:
    """A segment ended by a stop string leaves the job like one ended by EOS: its next
    segment continues the same context, token-exact with one that never stopped early."""
    preserved = live.backend.applied["admit_preserved"]

    async def main():
        free = await one_segment(live, "probe", prompt_text=PROMPT, max_tokens=40,
                                 temperature=0.0)
        stop = free.text[len(free.text) // 2:][:2]
        async with AsyncAgentClient(live.address) as client:
            await client.start_job("stopped")
            first = await client.run_segment("stopped", prompt_text=PROMPT, max_tokens=40,
                                             temperature=0.0, stop=[stop],
                                             next_tool_category="search")
            async with client.tool_call("stopped", "search"):
                pass
            second = await client.run_segment("stopped", prompt_text=" Observation: sunny.",
                                              max_tokens=16, temperature=0.0)
            await client.end_job("stopped")
        # The same context sent as ids in one piece to a fresh job.
        async with AsyncAgentClient(live.address) as client:
            await client.start_job("whole")
            tok = live.backend._get_tokenizer()
            ids = (tok.encode(PROMPT).ids + first.tokens
                   + tok.encode(" Observation: sunny.", add_special_tokens=False).ids)
            whole = await client.run_segment("whole", prompt_token_ids=ids, max_tokens=16,
                                             temperature=0.0)
            await client.end_job("whole")
        return stop, first, second, whole

    stop, first, second, whole = live.run(main())
    assert first.finish_reason is FinishReason.STOP and stop not in first.text
    assert live.backend.applied["admit_preserved"] - preserved == 1  # the stopped session
    assert second.tokens == whole.tokens


def test_a_preserved_job_samples_as_its_next_segment_says(live) -> None:
    """vLLM keeps one session per preserved job; each segment's sampling still applies."""
    preserved = live.backend.applied["admit_preserved"]

    async def job(job_id: str, second: dict):
        async with AsyncAgentClient(live.address) as client:
            await client.start_job(job_id)
            await client.run_segment(job_id, prompt_text=PROMPT, max_tokens=16,
                                     temperature=0.0, next_tool_category="search")
            async with client.tool_call(job_id, "search"):
                pass
            out = await client.run_segment(job_id, prompt_text=" Observation: sunny.",
                                           max_tokens=24, **second)
            await client.end_job(job_id)
            return out.tokens

    async def main():
        return (await job("sampled-a", {"temperature": 1.5, "seed": 3}),
                await job("sampled-b", {"temperature": 1.5, "seed": 3}),
                await job("greedy", {"temperature": 0.0}))

    a, b, greedy = live.run(main())
    assert live.backend.applied["admit_preserved"] - preserved == 3
    assert a == b  # the second segment's seed applies ...
    assert a != greedy  # ... and so does its temperature


def test_json_schema_output_is_a_valid_tool_call(live) -> None:
    async def main():
        return [await one_segment(live, f"json{i}", prompt_text=PROMPT, max_tokens=80,
                                  temperature=t, seed=i, json_schema=json.dumps(TOOL_CALL_SCHEMA))
                for i, t in enumerate((0.0, 1.0, 1.0))]

    for result in live.run(main()):
        assert result.finish_reason is FinishReason.STOP, result.text  # the grammar ended it
        call = json.loads(result.text)
        assert call["name"] == "get_weather"
        assert call["arguments"] in ({"city": "Tokyo"}, {"city": "Paris"})
        assert set(call) == {"name", "arguments"}
        with contextlib.suppress(ImportError):
            import jsonschema

            jsonschema.validate(call, TOOL_CALL_SCHEMA)


def test_json_schema_after_a_free_segment_and_free_after_a_schema(live) -> None:
    """The grammar belongs to its segment: a preserved job's next segment gets its own (or
    none), although vLLM keeps one session for the job."""
    preserved = live.backend.applied["admit_preserved"]

    async def main():
        async with AsyncAgentClient(live.address) as client:
            await client.start_job("mixed")
            outs = []
            for schema in (None, json.dumps(TOOL_CALL_SCHEMA), None):
                outs.append(await client.run_segment(
                    "mixed", prompt_text=" Next:", max_tokens=80, temperature=0.0,
                    json_schema=schema, next_tool_category="search"))
                async with client.tool_call("mixed", "search"):
                    pass
            await client.end_job("mixed")
            return outs

    free, constrained, after = live.run(main())
    assert live.backend.applied["admit_preserved"] - preserved == 2  # one vLLM session
    assert constrained.finish_reason is FinishReason.STOP, constrained.text
    assert json.loads(constrained.text)["name"] == "get_weather"
    for r in (free, after):  # the free segments are not held to the schema
        with pytest.raises(ValueError):
            json.loads(r.text)


def test_schema_the_grammar_cannot_compile_fails_the_job_with_the_reason(live) -> None:
    async def main():
        async with AsyncAgentClient(live.address) as client:
            await client.start_job("bad-schema")
            with pytest.raises(AstraeaError) as err:
                await client.run_segment("bad-schema", prompt_text=PROMPT, max_tokens=8,
                                         json_schema=json.dumps({"type": "no-such-type"}))
            state = (await client.get_job("bad-schema")).state
            # The worker is fine: the next job runs.
            ok = await one_segment(live, "after-bad", prompt_text=PROMPT, max_tokens=4,
                                   temperature=0.0)
            return err.value, state, ok

    err, state, ok = live.run(main())
    assert "json_schema does not compile" in err.message
    assert state == common_pb2.JOB_STATE_FINISHED
    assert len(ok.tokens) == 4


# --- the chat template -----------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Tokyo?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
]


def test_chat_template_renders_tools_calls_and_results(model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(CHAT, tools=TOOLS, add_generation_prompt=True,
                                   tokenize=False)
    assert text.startswith("<s><|system|>\nYou are terse.\n")
    assert json.dumps(TOOLS[0]["function"]) in text  # the tool, as JSON
    assert ('<tool_call>{"name": "get_weather", "arguments": {"city": "Tokyo"}}</tool_call>'
            '</s>') in text
    assert "<|tool|>\n<tool_response>sunny, 21 C</tool_response></s>" in text
    assert text.endswith("<|assistant|>\n")
    assert text.count("<s>") == 1
    # OpenAI sends arguments as a JSON string: rendered the same.
    as_string = [*CHAT[:2], {**CHAT[2], "tool_calls": [{
        "id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]}, CHAT[3]]
    assert tok.apply_chat_template(as_string, tools=TOOLS, add_generation_prompt=True,
                                   tokenize=False) == text
    # A tool as vLLM's server passes it (absent fields filled with null) renders the same.
    bare = {"name": "f", "parameters": {"type": "object"}}
    nulls = {**bare, "description": None, "strict": None}
    assert (tok.apply_chat_template(CHAT[1:2], tools=[{"type": "function", "function": bare}],
                                    tokenize=False)
            == tok.apply_chat_template(CHAT[1:2], tools=[{"type": "function", "function": nulls}],
                                       tokenize=False))
    ids = tok.apply_chat_template(CHAT, tools=TOOLS, add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    without = tok.apply_chat_template(CHAT[1:2], add_generation_prompt=False, tokenize=False)
    assert without == "<s><|user|>\nWeather in Tokyo?</s>\n"
