"""Sessions of the OpenAI gateway: finding a session by the messages it was sent, the chat
template fallback and tool-call parsing (units), and idle sessions ending their jobs (an
in-process gateway, `gateway.app.create_app` under uvicorn, in front of a live stack)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import grpc
import openai
import pytest

from gateway.chat import FALLBACK_TEMPLATE, ChatTokenizer, parse_tool_calls
from gateway.sessions import SessionTable, canonical, prefix_keys

USER = {"role": "user", "content": "hi", "tool_calls": None}
REPLY = {"role": "assistant", "content": "hello", "tool_calls": None}
NEXT = {"role": "user", "content": "more", "tool_calls": None}


def _after_turn(table: SessionTable, messages: list[dict], reply: dict):
    s = table.new(None)
    s.job_id, s.n_messages = "job", len(messages)
    table.turn_ended(s, prefix_keys([*messages, reply], None)[-1])
    return s


def test_a_request_that_extends_a_turn_finds_its_session_and_the_longest_wins():
    table = SessionTable()
    short = _after_turn(table, [USER], REPLY)
    long_ = _after_turn(table, [USER, REPLY, NEXT], REPLY)
    keys = prefix_keys([USER, REPLY, NEXT, REPLY, NEXT], None)
    assert table.find(None, keys) is long_ and long_.continues(keys)
    keys = prefix_keys([USER, REPLY, NEXT], None)
    assert table.find(None, keys) is short and short.continues(keys)
    # The reply alone (no new message) continues nothing; other tools change every key.
    assert table.find(None, prefix_keys([USER, REPLY], None)) is None
    assert table.find(None, prefix_keys([USER, REPLY, NEXT], [{"type": "function"}])) is None
    table.forget_turn(short)
    assert table.find(None, prefix_keys([USER, REPLY, NEXT], None)) is None


def test_tool_call_arguments_compare_as_json():
    def call(args):
        return {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]}
    assert canonical(call('{"a": 1, "b": 2}')) == canonical(call('{"b":2,"a":1}'))
    assert canonical(call('{"a": 1}')) != canonical(call('{"a": 2}'))


def test_tool_calls_are_parsed_out_of_the_text():
    text, calls = parse_tool_calls(
        'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '</tool_call>')
    assert text == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert parse_tool_calls("<tool_call>not json</tool_call>") == \
        ("<tool_call>not json</tool_call>", [])


@pytest.fixture(scope="module")
def tiny_folder():
    from worker.vllm.tiny_model import resolve_model

    return resolve_model(None)


@pytest.mark.parametrize("text", ["hello world", "<s><|user|>\n a a</s>\n<|assistant|>\n",
                                  "naïve café 東京 🙂 <tool_call>{\"a\": 1}</tool_call>",
                                  "     x", "</s></s>"])
def test_encoding_gives_the_tokenizers_own_ids(tiny_folder, text):
    """The gateway encodes through the Rust tokenizer directly: the ids must be exactly what
    the transformers tokenizer gives (special-token text included)."""
    tok = ChatTokenizer(tiny_folder)
    assert tok.encode(text) == list(tok.tok.encode(text, add_special_tokens=False))


def test_the_fallback_template_renders_every_role(tiny_folder):
    tok = ChatTokenizer(tiny_folder, FALLBACK_TEMPLATE)
    text = tok.render([{"role": "system", "content": "be brief", "tool_calls": None},
                       {"role": "user", "content": "hi", "tool_calls": None},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"id": "c", "type": "function",
                            "function": {"name": "f", "arguments": {"x": 1}}}]},
                       {"role": "tool", "content": "42", "tool_call_id": "c",
                        "tool_calls": None}], None, add_generation_prompt=True)
    assert text.startswith("<|system|>\nbe brief</s>\n<|user|>\nhi</s>\n")
    assert '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call></s>' in text
    assert text.endswith("<|tool|>\n42</s>\n<|assistant|>\n")
    assert tok.decode(tok.encode(text), skip_special=False) == text


def test_a_public_listen_address_without_a_key_is_refused(tiny_folder):
    out = subprocess.run([sys.executable, "-m", "gateway.server", "--listen", "0.0.0.0:0",
                          "--model", "m", "--tokenizer", tiny_folder],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no --api-key" in out.stderr


class _Gateway:
    """An in-process gateway under uvicorn, on its own thread and event loop."""

    def __init__(self, config, control_plane: str) -> None:
        import uvicorn

        from astraea.client import AsyncAgentClient
        from gateway.app import create_app

        self.loop = asyncio.new_event_loop()
        self.tokenizer = ChatTokenizer(config.tokenizer)

        async def build():
            self.channel = grpc.aio.insecure_channel(control_plane)
            client = AsyncAgentClient(channel=self.channel, timeout=10, segment_timeout=None)
            return create_app(config, client, self.tokenizer)

        self.app = self.loop.run_until_complete(build())
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.server.serve(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()


def test_an_idle_session_ends_its_job(tiny_folder):
    from astraea.tools.stack import Stack, StackConfig
    from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2
    from gateway.config import GatewayConfig

    cfg = StackConfig(workers=1, time_scale=0.1, control_plane_listen="127.0.0.1:0",
                      predictor=False)
    with Stack(cfg) as st:
        gw = _Gateway(GatewayConfig(model="m", tokenizer=tiny_folder, session_idle_s=0.5),
                      st.control_plane_address)
        try:
            with openai.OpenAI(base_url=gw.url, api_key="unused", max_retries=0) as client, \
                    grpc.insecure_channel(st.control_plane_address) as ch:
                raw = client.chat.completions.with_raw_response.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
                job_id = raw.headers["x-astraea-job-id"]
                stub = agent_pb2_grpc.AgentServiceStub(ch)
                deadline = time.monotonic() + 15
                while True:
                    status = stub.GetJob(agent_pb2.GetJobRequest(job_id=job_id))
                    if status.state == common_pb2.JOB_STATE_FINISHED:
                        break
                    assert time.monotonic() < deadline, "the idle session's job never ended"
                    time.sleep(0.1)
                # Its messages no longer find the session: a follow-up starts a new job.
                again = client.chat.completions.with_raw_response.create(model="m", messages=[
                    {"role": "user", "content": "hi"},
                    raw.parse().choices[0].message.model_dump(exclude_none=True),
                    {"role": "user", "content": "still there?"}], max_tokens=3)
                assert again.headers["x-astraea-job-id"] != job_id
        finally:
            gw.close()


def test_an_unreachable_control_plane_is_a_503(tiny_folder):
    from gateway.config import GatewayConfig

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    gw = _Gateway(GatewayConfig(model="m", tokenizer=tiny_folder), dead)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model="m", max_tokens=2,
                                               messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503
        assert e.value.response.json()["error"]["code"] == "control_plane_unavailable"
    finally:
        gw.close()


def test_an_overloaded_control_plane_is_a_429_with_retry_after():
    from gateway.errors import from_grpc

    e = from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many jobs")
    assert e.status == 429 and e.headers["Retry-After"].isdigit()
    assert e.body()["error"]["type"] == "rate_limit_error"
