"""`astraea-gateway`: the OpenAI Chat Completions, Responses and (legacy) Completions APIs in
front of the control plane.

A separate service, a client of `AgentService` over gRPC like any other (several gateways may
run side by side); it imports only `astraea`. Each chat session is one Astraea job and each
request one segment of it; see docs/design.md ("The OpenAI gateway").

    config.py           the gateway's settings
    errors.py           OpenAI-shaped errors, and gRPC statuses mapped to HTTP ones
    schemas.py          the chat request body, validated (pydantic)
    chat.py             the chat template, tokenizing, decoding, tool-call parsing
    sessions.py         sessions: found by id or by prompt prefix, one job each, idle reaping
    shared_sessions.py  named sessions in the durable store, shared by gateways (--database)
    completions.py      one chat request as one segment, answered whole or streamed
    response_schemas.py the Responses API request body, and its translation into a chat one
    response_store.py   stored responses (for retrieval and previous_response_id), in memory
                        or in the durable store
    responses.py        the Responses API: a response is a chat turn; its streamed events
    text_completions.py /v1/completions: one-segment jobs, or segments of a named session
    app.py              the FastAPI app
    server.py           the command line
"""
