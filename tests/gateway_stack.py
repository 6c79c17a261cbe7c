"""The stack the gateway's API tests drive: a control plane, a simulated worker and the
gateway as separate processes (as `astraea up --http` starts them), the official `openai`
SDK as the client, and the control plane's GetJob to look behind the API."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import grpc
import openai

from astraea.tools.stack import Stack, StackConfig
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2


@contextlib.contextmanager
def sim_gateway_stack(api_key: str, model: str) -> Iterator[Stack]:
    cfg = StackConfig(workers=1, time_scale=0.1, control_plane_listen="127.0.0.1:0",
                      predictor=False, http_listen="127.0.0.1:0", api_keys=[api_key],
                      served_model=model)
    with Stack(cfg) as st:
        yield st


@contextlib.contextmanager
def openai_client(stack: Stack, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.http_address}/v1", api_key=api_key, max_retries=0,
                       timeout=60) as c:
        yield c


@contextlib.contextmanager
def job_lookup(stack: Stack) -> Iterator[Callable[[str], common_pb2.JobStatus]]:
    """GetJob on the stack's control plane, by job id."""
    with grpc.insecure_channel(stack.control_plane_address) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        yield lambda job_id: stub.GetJob(agent_pb2.GetJobRequest(job_id=job_id), timeout=5)
