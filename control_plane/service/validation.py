"""Checks of client requests and worker reports. Each failure raises `InvalidRequest` naming
the field, the value and what is allowed, so the client gets an INVALID_ARGUMENT it can act
on. The bounds themselves are in limits.py."""

from __future__ import annotations

import json
import math

from astraea.errors import InvalidRequest
from astraea.plan import WorkerInfo
from astraea.v1 import agent_pb2, common_pb2, worker_pb2
from control_plane.service.context import ServiceConfig

# Without a tokenizer in the control plane, text is counted at ~4 bytes per token (the usual
# BPE average for English); the worker tokenizes the text itself.
BYTES_PER_TOKEN = 4


def check_id(value: str, field: str, cfg: ServiceConfig) -> None:
    if len(value) > cfg.max_id_chars:
        raise InvalidRequest(f"{field} has {len(value)} characters: at most {cfg.max_id_chars}")


def prompt_tokens(req: agent_pb2.RunSegmentRequest, cfg: ServiceConfig) -> int:
    """The number of tokens the request appends; rejects a missing, empty or huge prompt."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequest("RunSegmentRequest needs exactly one of prompt_text or "
                             "prompt_token_ids")
    if which == "prompt_text":
        text = req.prompt_text
        if not text:
            raise InvalidRequest("prompt_text is empty: a segment must append input")
        if len(text) > cfg.max_prompt_chars:
            raise InvalidRequest(f"prompt_text has {len(text)} characters: at most "
                                 f"{cfg.max_prompt_chars}")
        return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)
    n = len(req.prompt_token_ids.ids)
    if n == 0:
        raise InvalidRequest("prompt_token_ids is empty: a segment must append input")
    return n


def hints(req: agent_pb2.RunSegmentRequest, cfg: ServiceConfig,
          max_context: int) -> tuple[int | None, float | None]:
    """The client's expected output tokens and tool seconds (None where unset). An output
    beyond the context window, or a tool longer than the API-wait timeout (after which the
    job is ended anyway), is refused rather than clipped: it says the client is confused."""
    tokens = req.expected_output_tokens if req.HasField("expected_output_tokens") else None
    if tokens is not None and not 1 <= tokens <= max_context:
        raise InvalidRequest(f"expected_output_tokens is {tokens}: from 1 to the context "
                             f"window, {max_context}")
    tool_s = req.expected_tool_s if req.HasField("expected_tool_s") else None
    if tool_s is not None and not (math.isfinite(tool_s)
                                   and 0 <= tool_s <= cfg.api_wait_timeout_s):
        raise InvalidRequest(f"expected_tool_s is {tool_s}: from 0 to the API-wait timeout, "
                             f"{cfg.api_wait_timeout_s:g} s")
    return tokens, tool_s


def sampling(req: common_pb2.SamplingParams, cfg: ServiceConfig, max_context: int,
             context_tokens: int, new_tokens: int) -> common_pb2.SamplingParams:
    """The request's sampling with defaults filled in; rejects values out of range, and a
    segment whose context, input and budget cannot fit the model's context window."""
    out = common_pb2.SamplingParams()
    out.CopyFrom(req)
    if req.HasField("temperature"):
        t = req.temperature
        if not (math.isfinite(t) and 0.0 <= t <= cfg.max_temperature):
            raise InvalidRequest(f"sampling.temperature is {t}: must be in [0, "
                                 f"{cfg.max_temperature}]")
    else:
        out.temperature = 1.0
    if req.HasField("top_p"):
        p = req.top_p
        if not (math.isfinite(p) and 0.0 < p <= 1.0):
            raise InvalidRequest(f"sampling.top_p is {p}: must be in (0, 1]")
    else:
        out.top_p = 1.0
    if len(req.stop) > cfg.max_stop_strings:
        raise InvalidRequest(f"sampling.stop has {len(req.stop)} strings: at most "
                             f"{cfg.max_stop_strings}")
    for i, s in enumerate(req.stop):
        if not s or len(s) > cfg.max_stop_chars:
            raise InvalidRequest(f"sampling.stop[{i}] must have 1 to {cfg.max_stop_chars} "
                                 "characters")
    if req.json_schema:
        json_schema(req.json_schema, cfg)
    room = max_context - context_tokens - new_tokens
    if room < 1:
        raise InvalidRequest(f"prompt too long: the job's {context_tokens} context tokens plus "
                             f"{new_tokens} new ones leave no room in the {max_context}-token "
                             "context window")
    if req.HasField("max_tokens"):
        m = req.max_tokens
        if m < 1:
            raise InvalidRequest("sampling.max_tokens is 0: must be at least 1")
        if m > room:
            raise InvalidRequest(f"sampling.max_tokens is {m}: at most {room} fit in the "
                                 f"{max_context}-token context window after the job's "
                                 f"{context_tokens + new_tokens} tokens")
    else:
        out.max_tokens = min(cfg.default_max_tokens, room)
    return out


def json_schema(text: str, cfg: ServiceConfig) -> None:
    """A structured-output schema must be a JSON object of bounded size; whether the
    worker's grammar backend can compile it is the worker's to say (it refuses the Admit)."""
    if len(text) > cfg.max_json_schema_chars:
        raise InvalidRequest(f"sampling.json_schema has {len(text)} characters: at most "
                             f"{cfg.max_json_schema_chars}")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"sampling.json_schema is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"sampling.json_schema must be a JSON object (a schema), not "
                             f"{type(schema).__name__}")


def memory_report(m: worker_pb2.MemoryReport, info: WorkerInfo) -> None:
    """A worker's report must agree with what it registered: the planner trusts these numbers
    (a report of 4,294,967,295 free blocks out of 1 would draw every job to that worker)."""
    if m.block_size != info.block_size:
        raise InvalidRequest(f"MemoryReport.block_size is {m.block_size}: registered "
                             f"{info.block_size}")
    if m.total_blocks > info.kv_capacity_blocks:
        raise InvalidRequest(f"MemoryReport.total_blocks is {m.total_blocks}: registered "
                             f"{info.kv_capacity_blocks}")
    for name in ("free_blocks", "swapping_out_blocks"):
        if getattr(m, name) > m.total_blocks:
            raise InvalidRequest(f"MemoryReport.{name} is {getattr(m, name)}: more than "
                                 f"total_blocks {m.total_blocks}")
    if m.host_free_blocks > info.host_swap_blocks:
        raise InvalidRequest(f"MemoryReport.host_free_blocks is {m.host_free_blocks}: "
                             f"registered host_swap_blocks {info.host_swap_blocks}")
    if m.running_seqs > info.max_num_seqs or m.max_seqs > info.max_num_seqs:
        raise InvalidRequest(f"MemoryReport.running_seqs/max_seqs are {m.running_seqs}/"
                             f"{m.max_seqs}: registered max_num_seqs {info.max_num_seqs}")
    if not (math.isfinite(m.step_time_s) and m.step_time_s >= 0):
        raise InvalidRequest(f"MemoryReport.step_time_s is {m.step_time_s}: must be a finite "
                             "number >= 0")
