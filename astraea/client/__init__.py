"""Python client of the Astraea control plane's `astraea.v1.AgentService`.

The canonical agent loop — run a segment, run the tool it calls, resume — with the async
client (the sync `AgentClient` has the same methods without `await`)::

    from astraea.client import AsyncAgentClient, FinishReason

    async with AsyncAgentClient("127.0.0.1:50051") as client:
        job = await client.start_job(category="react")
        prompt = "Find the population of Lyon."
        while True:
            seg = await client.run_segment(job, prompt_text=prompt, max_tokens=256,
                                           next_tool_category="search")
            if seg.finish_reason is not FinishReason.TOOL_CALL:
                break                              # STOP or LENGTH: the answer is complete
            async with client.tool_call(job, "search"):   # ReportToolCall START … END
                prompt = await run_my_tool(seg.text)      # the tool's result is the next input
        status = await client.end_job(job)

A segment ends in a tool call exactly when `next_tool_category` is non-empty (the simulated
workers follow that hint); pass None on the segment that gives the final answer.
`stream_segment` yields the tokens as they arrive instead of collecting them. Every gRPC
error is raised as `AstraeaError` carrying the status code and the server's message.

Set `client.retry = RetryPolicy(total_s=30)` to ride out a control-plane restart: calls that
fail UNAVAILABLE are retried with backoff, and a segment stream that broke is resumed where it
stopped (`resume_from_index`) on a control plane with durable state (see retry.py).

Every call carries the current OpenTelemetry context (W3C ``traceparent``): start the job
inside a span of your agent and the control plane's ``job`` trace continues it, so one trace
holds your agent, the scheduling of its segments and their runs on the workers.
"""

from astraea.client.client import (
    AgentClient,
    AstraeaError,
    AsyncAgentClient,
    FinishReason,
    RetryPolicy,
    SegmentResult,
    StreamOrderError,
    Timings,
    TokenChunk,
)

__all__ = [
    "AgentClient", "AstraeaError", "AsyncAgentClient", "FinishReason", "RetryPolicy",
    "SegmentResult",
    "StreamOrderError", "Timings", "TokenChunk",
]
